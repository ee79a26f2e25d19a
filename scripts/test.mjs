#!/usr/bin/env node
// `npm test`: install what the tests need, run every package's tests with vitest, and end with one plain
// summary line ("Tests: N passed, N failed") that CI systems and people can read without parsing vitest's UI.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { ensureNpmDeps, root } from "./ensure-deps.mjs";

ensureNpmDeps();
const reportDir = join(root, ".cache");
mkdirSync(reportDir, { recursive: true });
const report = join(reportDir, "vitest-report.json");
rmSync(report, { force: true });
const args = process.argv.slice(2);
// The reliability suite (several minutes against a whole stack) has its own command, `npm run test:chaos`, which CI
// runs after this one: leave it out unless a project is named.
const projects = args.some((a) => a === "--project" || a.startsWith("--project=")) ? [] : ["--project", "!chaos"];
const r = spawnSync(
  "npx",
  ["vitest", "run", "--reporter=default", "--reporter=json", `--outputFile.json=${report}`, ...projects, ...args],
  { cwd: root, stdio: "inherit" },
);
if (existsSync(report)) {
  const { numPassedTests, numFailedTests, numPendingTests, testResults } = JSON.parse(readFileSync(report, "utf8"));
  // A file that fails to load runs no test at all: count it as a failure, not as nothing.
  const brokenFiles = testResults.filter((f) => f.status === "failed" && f.assertionResults.length === 0).length;
  const failed = numFailedTests + brokenFiles;
  console.log(
    `\nTests: ${numPassedTests} passed, ${failed} failed${numPendingTests ? `, ${numPendingTests} skipped` : ""}`,
  );
}
process.exit(r.status ?? 1);
