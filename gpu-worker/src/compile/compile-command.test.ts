/**
 * `llama-worker compile` and `--model org/name` as users run them: child processes against a local fake Hub
 * (HF_ENDPOINT), with their own Hub cache (HF_HOME) and compile cache (LLAMA_EDGE_CACHE_DIR).
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type FakeHub, startFakeHub } from "../../test/fake-hub.ts";
import { ensureDefaultModel } from "../model/default-model.ts";

const BIN = fileURLToPath(new URL("../../bin/llama-worker.js", import.meta.url));
const REPO = "karpathy/stories15m-random";

let tmp: string;
let hub: FakeHub;
let localDir: string;
let env: NodeJS.ProcessEnv;

/** Runs the CLI without blocking this process (the fake Hub answers from here). */
function run(...args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [BIN, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (c: string) => (stdout += c));
  child.stderr.setEncoding("utf8").on("data", (c: string) => (stderr += c));
  return new Promise((resolve) => child.once("close", (status) => resolve({ status, stdout, stderr })));
}

/** Token ids `generate` produces for one greedy prompt with `--model model`. */
async function tokens(model: string): Promise<number[]> {
  const r = await run("generate", "--model", model, "--prompt", "Once upon a time", "--max-tokens", "8", "--json");
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout).token_ids;
}

beforeAll(async () => {
  localDir = await ensureDefaultModel("default", { quiet: true });
  const files: Record<string, Uint8Array> = {};
  for (const f of readdirSync(localDir)) files[f] = readFileSync(join(localDir, f));
  hub = await startFakeHub({ [REPO]: { files }, "org/stalled": { files } });
  tmp = mkdtempSync(join(tmpdir(), "llama-compile-"));
  env = {
    ...process.env,
    HF_ENDPOINT: hub.url,
    HF_HOME: join(tmp, "hf"),
    HF_TOKEN: "",
    LLAMA_EDGE_CACHE_DIR: join(tmp, "cache"),
  };
});

afterAll(async () => {
  await hub?.close();
  rmSync(tmp, { recursive: true, force: true });
});

describe("models by name and compiled directories", () => {
  it("compiles a Hub model once into a directory that generate serves without compiling", async () => {
    const out = join(tmp, "compiled");
    const r = await run("compile", "--model", REPO, "--out", out);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toContain(`downloading ${REPO}:`); // not a terminal: log lines, not a bar
    expect(r.stderr).toMatch(/done: .*weights\.bin .*download .* s, compile .* s/);
    expect(readdirSync(out).sort()).toEqual([
      "compiled.json",
      "config.json",
      "generation_config.json",
      "tokenizer.json",
      "tokenizer_config.json",
      "weights.bin",
    ]);
    const manifest = JSON.parse(readFileSync(join(out, "compiled.json"), "utf8"));
    expect(manifest).toMatchObject({ format: "llama-edge-compiled", name: REPO, quantization: "none" });
    expect(manifest.source).toMatch(new RegExp(`^hf://${REPO}@[0-9a-f]{40}$`));

    const again = await run("compile", "--model", REPO, "--out", out);
    expect(again.status, again.stderr).toBe(0);
    expect(again.stderr).toContain("nothing to do");

    // Served from the compiled directory: nothing is packed into the compile cache.
    const fromCompiled = await tokens(out);
    expect(existsSync(join(tmp, "cache", "compiled"))).toBe(false);
    // The same weights by repo id (from the Hub cache now) and from the local checkpoint: the same tokens.
    expect(await tokens(REPO)).toEqual(fromCompiled);
    expect(await tokens(localDir)).toEqual(fromCompiled);
  });

  it("refuses a compiled directory of another compiler version, naming compiled.json", async () => {
    const out = join(tmp, "old-compiled");
    mkdirSync(out);
    const src = join(tmp, "compiled");
    for (const f of readdirSync(src)) copyFileSync(join(src, f), join(out, f));
    const manifest = JSON.parse(readFileSync(join(out, "compiled.json"), "utf8"));
    writeFileSync(join(out, "compiled.json"), JSON.stringify({ ...manifest, compiler_version: 999 }));
    const r = await run("generate", "--model", out, "--prompt", "x");
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/compiled\.json: compiled by compiler version 999, .*run llama-worker compile again\n$/);
  });

  it("names the repo for a repo that does not exist, in one line", async () => {
    const r = await run("generate", "--model", "org/does-not-exist", "--prompt", "x");
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^llama-worker: org\/does-not-exist: repository not found.*HF_TOKEN is not set.*\n$/);
  });

  it("SIGTERM while compiling removes this process's temp files and exits", async () => {
    // A checkpoint whose weights file is a FIFO nobody writes: the compile thread blocks reading it, so the
    // signal is certain to arrive mid-compile.
    const blocked = join(tmp, "blocked-model");
    mkdirSync(blocked);
    for (const f of ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"])
      copyFileSync(join(localDir, f), join(blocked, f));
    expect(spawnSync("mkfifo", [join(blocked, "model.safetensors")]).status).toBe(0);
    const out = join(tmp, "interrupted");
    const child = spawn(process.execPath, [BIN, "compile", "--model", blocked, "--out", out], { env });
    let stderr = "";
    await waitFor(
      child,
      () => stderr,
      (s) => s.includes("compiling "),
      (chunk) => (stderr += chunk),
    );
    // What the compile thread would have created by now: a staging dir under this process's id.
    const staging = join(out, `.compile.tmp-${child.pid}-1`);
    mkdirSync(staging);
    writeFileSync(join(staging, "weights.bin.tmp"), "partial");
    // A stale leftover of another, killed compile stays until nobody has written to it for a while.
    const other = join(out, ".compile.tmp-999999-1");
    mkdirSync(other);
    child.kill("SIGTERM");
    const code = await new Promise((resolve) => child.once("exit", (c, sig) => resolve(c ?? sig)));
    expect(code).toBe(143);
    expect(existsSync(staging)).toBe(false);
    expect(existsSync(other)).toBe(true);
    expect(stderr).toContain(`SIGTERM: removed ${staging}`);
  });
});

/** Resolves once `done(text())` holds for the child's stderr so far; rejects if the child exits first. */
function waitFor(
  child: ChildProcess,
  text: () => string,
  done: (s: string) => boolean,
  onChunk: (chunk: string) => void,
): Promise<void> {
  return new Promise((resolve, reject) => {
    child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
      onChunk(chunk);
      if (done(text())) resolve();
    });
    child.once("exit", (code) => reject(new Error(`exited with ${code} first: ${text()}`)));
  });
}
