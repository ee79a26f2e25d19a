// Starts a nats-server (JetStream + WebSocket listener on free loopback ports) for the workerd tests, and hands
// its WebSocket URL to them through vitest's provide/inject. Builds the console first: wrangler.jsonc serves it as
// static assets, and the workerd pool refuses a config whose assets directory is missing.

import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestProject } from "vitest/node";
import { buildConsole } from "../../console/build.mjs";
import { startNats } from "../../scripts/nats.mjs";

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const addr = s.address();
      s.close(() => resolve(typeof addr === "object" && addr ? addr.port : 0));
    });
  });
}

declare module "vitest" {
  export interface ProvidedContext {
    natsWsUrl: string;
    natsUrl: string;
  }
}

export default async function setup(project: TestProject) {
  await buildConsole();
  const dir = mkdtempSync(join(tmpdir(), "llama-edge-nats-"));
  const nats = await startNats({ dir, port: await freePort(), wsPort: await freePort(), httpPort: await freePort() });
  project.provide("natsWsUrl", nats.wsUrl);
  project.provide("natsUrl", nats.url);
  return async () => {
    await nats.stop();
    rmSync(dir, { recursive: true, force: true });
  };
}
