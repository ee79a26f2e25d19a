// Starts a nats-server (JetStream + WebSocket listener on free loopback ports) for the workerd tests, and hands
// its WebSocket URL to them through vitest's provide/inject. Builds the console first: wrangler.jsonc serves it as
// static assets, and the workerd pool refuses a config whose assets directory is missing.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestProject } from "vitest/node";
import { buildConsole } from "../../console/build.mjs";
import { startNats } from "../../scripts/nats.mjs";
import { freePort } from "../../scripts/ports.mjs";

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
