/**
 * One `npm start` stack for the whole chaos suite (vitest globalSetup): two workers, and the scenarios run one file
 * at a time against it, each leaving it serving. Workers log at info (the disconnect scenario reads their cancel and finish
 * lines); the pool's ack_wait is 3 s so that a request held by a dead worker comes back quickly.
 */
import { copyFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import type { TestProject } from "vitest/node";
import { type LocalStackInfo, startLocalStack } from "../helpers/local-stack.ts";

const LOG_DIR = join(import.meta.dirname, "..", "..", ".cache", "chaos");

declare module "vitest" {
  export interface ProvidedContext {
    stack: LocalStackInfo;
  }
}

export default async function setup(project: TestProject) {
  const stack = await startLocalStack({
    args: ["--workers", "2", "--max-num-seqs", "64"],
    env: { LLAMA_ACK_WAIT: "3", LLAMA_LOG_LEVEL: "info" },
  });
  const { proc: _proc, exited: _exited, stop: _stop, ...info } = stack;
  project.provide("stack", info);
  return async () => {
    // Kept for a look after a failure: .cache/chaos/start.log (the supervisor's and the workers' logs).
    mkdirSync(LOG_DIR, { recursive: true });
    copyFileSync(stack.logFile, join(LOG_DIR, "start.log"));
    const code = await stack.stop("SIGTERM");
    if (code !== 0) throw new Error(`npm start exited with ${code} on SIGTERM`);
  };
}
