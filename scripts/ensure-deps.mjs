#!/usr/bin/env node
// Installs npm dependencies when node_modules is missing or older than package-lock.json, so `npm start` and
// `npm test` work on a fresh clone. onnxruntime-node's install script would try to download CUDA libraries
// (and fail offline, rolling back the whole install): ONNXRUNTIME_NODE_INSTALL=skip keeps the CPU build it ships.
import { spawnSync } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const root = join(dirname(fileURLToPath(import.meta.url)), "..");

export function ensureNpmDeps() {
  const marker = join(root, "node_modules", ".package-lock.json");
  const lock = join(root, "package-lock.json");
  if (existsSync(marker) && (!existsSync(lock) || statSync(marker).mtimeMs >= statSync(lock).mtimeMs)) return;
  console.error("[llama-edge] installing npm dependencies (npm ci)…");
  const r = spawnSync("npm", ["ci", "--no-audit", "--no-fund"], {
    cwd: root,
    stdio: "inherit",
    env: { ...process.env, ONNXRUNTIME_NODE_INSTALL: process.env.ONNXRUNTIME_NODE_INSTALL ?? "skip" },
  });
  if (r.status !== 0) {
    console.error("[llama-edge] npm ci failed");
    process.exit(r.status ?? 1);
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) ensureNpmDeps();
