#!/usr/bin/env node
// `npm start`: until the gateway exists, generate with the default model through the worker CLI.
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { ensureNpmDeps, root } from "./ensure-deps.mjs";

ensureNpmDeps();
const args = process.argv.slice(2);
const r = spawnSync(
  process.execPath,
  [
    join(root, "gpu-worker", "bin", "llama-worker.js"),
    "generate",
    ...(args.length ? args : ["--prompt", "Once upon a time"]),
  ],
  { cwd: root, stdio: "inherit" },
);
process.exit(r.status ?? 1);
