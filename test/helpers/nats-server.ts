/**
 * A throwaway nats-server for one test file: free ports, a temporary JetStream store, and `restart()` on the same
 * ports and store (what a NATS pod restart looks like to the clients).
 *
 * @module
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type NatsHandle, startNats } from "../../scripts/nats.mjs";
import { freePort } from "../../scripts/ports.mjs";

export interface TestNats {
  url: string;
  wsUrl: string;
  httpPort: number;
  /** Stops the server (SIGTERM) and starts it again with the same ports and store. */
  restart(opts?: { downMs?: number }): Promise<void>;
  stop(): Promise<void>;
}

export async function startTestNats(): Promise<TestNats> {
  const dir = mkdtempSync(join(tmpdir(), "llama-edge-nats-"));
  const opts = {
    dir,
    port: await freePort(),
    wsPort: await freePort(),
    httpPort: await freePort(),
    storeDir: join(dir, "jetstream"),
  };
  let handle: NatsHandle = await startNats(opts);
  return {
    url: handle.url,
    wsUrl: handle.wsUrl,
    httpPort: handle.httpPort,
    async restart({ downMs = 0 } = {}) {
      await handle.stop();
      if (downMs > 0) await new Promise((r) => setTimeout(r, downMs));
      handle = await startNats(opts);
    },
    async stop() {
      await handle.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
