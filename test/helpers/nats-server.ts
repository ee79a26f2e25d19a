/**
 * A throwaway nats-server for one test file: free ports, a temporary JetStream store, and `restart()` on the same
 * ports and store (what a NATS pod restart looks like to the clients).
 *
 * @module
 */
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type NatsHandle, startNats } from "../../scripts/nats.mjs";

export interface TestNats {
  url: string;
  wsUrl: string;
  httpPort: number;
  /** Stops the server (SIGTERM) and starts it again with the same ports and store. */
  restart(opts?: { downMs?: number }): Promise<void>;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const { port } = srv.address() as { port: number };
  await new Promise((resolve) => srv.close(resolve));
  return port;
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
