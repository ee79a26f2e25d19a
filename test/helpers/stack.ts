/**
 * The stack `npm start` runs, for end-to-end tests: a throwaway nats-server, one `llama-worker serve` on the
 * generated default model, and the gateway under `wrangler dev` with its own Durable Object storage.
 *
 * @module
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Gateway, type GatewayOptions, startGateway } from "../../edge/dev/gateway.mjs";
import { startTestNats, type TestNats } from "./nats-server.ts";
import { startWorkerProcess, type WorkerProcess } from "./worker-process.ts";

export interface TestStack {
  nats: TestNats;
  worker: WorkerProcess;
  gw: Gateway;
  /** The gateway's state directory (removed by stop). */
  stateDir: string;
  stop(): Promise<void>;
}

export async function startStack(opts: { workerId: string; config: GatewayOptions["config"] }): Promise<TestStack> {
  const nats = await startTestNats();
  const stateDir = mkdtempSync(join(tmpdir(), "llama-edge-gw-"));
  const [worker, gw] = await Promise.all([
    startWorkerProcess({ natsUrl: nats.url, pool: "default", workerId: opts.workerId }),
    startGateway({ natsWsUrl: nats.wsUrl, persistTo: stateDir, config: opts.config }),
  ]);
  return {
    nats,
    worker,
    gw,
    stateDir,
    async stop() {
      await gw.stop();
      worker.kill("SIGTERM");
      await worker.exited;
      await nats.stop();
      rmSync(stateDir, { recursive: true, force: true });
    },
  };
}
