#!/usr/bin/env node
// `npm test`: install what the tests need, then run every package's tests with vitest.
import { spawnSync } from "node:child_process";
import { ensureNpmDeps, root } from "./ensure-deps.mjs";

ensureNpmDeps();
const r = spawnSync("npx", ["vitest", "run", ...process.argv.slice(2)], { cwd: root, stdio: "inherit" });
process.exit(r.status ?? 1);
