/** `llama-worker generate` as users and scripts call it: a child process, its stdout, stderr and exit code. */
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureDefaultModel } from "./model/default-model.ts";

const BIN = fileURLToPath(new URL("../bin/llama-worker.js", import.meta.url));
const run = (...args: string[]) => spawnSync(process.execPath, [BIN, ...args], { encoding: "utf8", timeout: 120_000 });

let tmp: string;
beforeAll(async () => {
  await ensureDefaultModel("default", { quiet: true });
  tmp = mkdtempSync(join(tmpdir(), "llama-cli-"));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("llama-worker generate", () => {
  it("prints one JSON object per prompt, in input order, greedy and reproducible", () => {
    const file = join(tmp, "prompts.jsonl");
    writeFileSync(file, `${JSON.stringify("from a file")}\n`);
    const args = [
      "generate",
      "--prompt",
      "Once upon a time",
      "--prompt",
      "",
      "--prompts-file",
      file,
      "--max-tokens",
      "5",
      "--json",
    ];
    const r = run(...args);
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(lines).toHaveLength(3);
    for (const l of lines) {
      expect(Object.keys(l).sort()).toEqual([
        "cached_tokens",
        "finish_reason",
        "prompt_token_ids",
        "text",
        "token_ids",
      ]);
      expect(l.token_ids).toHaveLength(5);
      expect(l.finish_reason).toBe("length");
    }
    expect(lines[0].prompt_token_ids).toEqual([1, 9038, 2501, 263, 931]); // bos + "Once upon a time"
    expect(lines[1].prompt_token_ids).toEqual([1]); // --prompt "": generation from BOS alone
    expect(run(...args).stdout).toBe(r.stdout);
  });

  it("fails with one line naming the file for a bad checkpoint, and names a bad flag value", () => {
    const bad = run("generate", "--model", join(tmp, "missing"), "--prompt", "x");
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/missing.*config\.json.*not found/);
    expect(bad.stderr).not.toMatch(/\n\s+at /); // no stack trace
    const flag = run("generate", "--temperature", "hot");
    expect(flag.status).toBe(1);
    expect(flag.stderr).toMatch(/--temperature must be a number/);
  });

  it("--quantization int8/int4 compiles and serves the quantized model; a bad value is named", () => {
    for (const q of ["int8", "int4"]) {
      const r = run(
        "generate",
        "--quantization",
        q,
        "--threads",
        "1",
        "--prompt",
        "Once",
        "--max-tokens",
        "3",
        "--json",
      );
      expect(r.status, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout).token_ids).toHaveLength(3);
    }
    const bad = run("generate", "--quantization", "int3");
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/--quantization must be one of none, int8, int4, got "int3"/);
    const threads = run("generate", "--threads", "0");
    expect(threads.status).toBe(1);
    expect(threads.stderr).toMatch(/--threads must be an integer >= 1/);
  });
});
