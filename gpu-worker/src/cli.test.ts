/** `llama-worker generate` as users and scripts call it: a child process, its stdout, stderr and exit code. */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadLlamaConfig } from "./model/config.ts";
import { ensureDefaultModel } from "./model/default-model.ts";
import { LlamaWeights } from "./model/weights.ts";

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
    expect(bad.stderr).toMatch(/missing: no such directory\n$/);
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

describe("llama-worker random-model", () => {
  it("writes a loadable checkpoint of the shape and dtype asked, the same bytes every time", () => {
    const out = (n: number) => join(tmp, `random-${n}`);
    for (const n of [1, 2]) {
      const r = run("random-model", "--shape", "default", "--dtype", "bf16", out(n));
      expect(r.status, r.stderr).toBe(0);
      expect(r.stderr).toMatch(/100%/); // progress lines when stderr is not a terminal
    }
    const cfg = loadLlamaConfig(out(1));
    expect([cfg.hiddenSize, cfg.numHiddenLayers, cfg.vocabSize]).toEqual([288, 6, 32000]);
    expect(LlamaWeights.open(out(1), cfg).dtype).toBe("BF16");
    const bytes = (n: number) => readFileSync(join(out(n), "model.safetensors"));
    expect(bytes(1).equals(bytes(2))).toBe(true);
    const g = run("generate", "--model", out(1), "--prompt", "Hi", "--max-tokens", "2", "--json");
    expect(g.status, g.stderr).toBe(0);
  });

  it("names a bad shape or dtype and exits 2", () => {
    const shape = run("random-model", "--shape", "llama9-1t", join(tmp, "x"));
    expect(shape.status).toBe(2);
    expect(shape.stderr).toMatch(/--shape must be one of default, bench, llama2-7b, llama3-8b/);
    const dtype = run("random-model", "--dtype", "f8", join(tmp, "y"));
    expect(dtype.status).toBe(2);
    expect(dtype.stderr).toMatch(/--dtype must be f32, f16 or bf16/);
  });
});
