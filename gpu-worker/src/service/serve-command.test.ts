import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, test, vi } from "vitest";
import { startFakeHub } from "../../test/fake-hub.ts";
import { ensureDefaultModel } from "../model/default-model.ts";
import { serveCommand } from "./serve-command.ts";

describe("llama-worker serve", () => {
  test("bad usage returns 2 with a message, before loading anything", async () => {
    const stderr = vi.spyOn(process.stderr, "write").mockImplementation(() => true);
    try {
      expect(await serveCommand(["--pool", "Not_Valid"])).toBe(2);
      expect(await serveCommand(["--max-num-seqs", "two"])).toBe(2);
      expect(await serveCommand(["--no-such-flag"])).toBe(2);
      expect(String(stderr.mock.calls.at(-1)?.[0])).toContain("Usage: llama-worker serve");
    } finally {
      stderr.mockRestore();
    }
  });

  test("environment variables stand in for flags; flags win", async () => {
    const stderr = vi.spyOn(process.stderr, "write").mockImplementation(() => true);
    vi.stubEnv("LLAMA_POOL", "BAD POOL");
    try {
      expect(await serveCommand([])).toBe(2);
      expect(String(stderr.mock.calls[0]?.[0])).toContain('"BAD POOL"');
      // The flag wins over the (invalid) environment value, so parsing gets further: to the invalid device.
      expect(await serveCommand(["--pool", "ok", "--device", "tpu"])).toBe(2);
      expect(String(stderr.mock.calls[1]?.[0])).toContain("--device");
    } finally {
      vi.unstubAllEnvs();
      stderr.mockRestore();
    }
  });
});

describe("llama-worker serve, stopped while loading", () => {
  test("SIGTERM during loading exits at once and still removes this process's compile temp dirs", async () => {
    const modelDir = await ensureDefaultModel("default", { quiet: true });
    const files: Record<string, Uint8Array> = {};
    for (const f of readdirSync(modelDir)) files[f] = readFileSync(join(modelDir, f));
    const hub = await startFakeHub({ "org/slow": { files } });
    // The weights never arrive: the worker stays in its loading phase for as long as the test needs.
    hub.fault("org/slow", "model.safetensors", { stall: true });
    const tmp = mkdtempSync(join(tmpdir(), "llama-serve-stop-"));
    try {
      const bin = fileURLToPath(new URL("../../bin/llama-worker.js", import.meta.url));
      const child = spawn(process.execPath, [bin, "serve", "--model", "org/slow", "--health-port", "0"], {
        env: { ...process.env, HF_ENDPOINT: hub.url, HF_HOME: join(tmp, "hf"), LLAMA_EDGE_CACHE_DIR: tmp },
        stdio: ["ignore", "pipe", "pipe"],
      });
      let out = "";
      await new Promise<void>((resolve, reject) => {
        child.stdout.setEncoding("utf8").on("data", (c: string) => {
          out += c;
          if (out.includes("downloading org/slow")) resolve();
        });
        child.once("exit", (code) => reject(new Error(`exited with ${code}: ${out}`)));
      });
      // What the engine thread would be writing if the stop came while packing the weights.
      const temp = join(tmp, "compiled", `abc.tmp-${child.pid}-1`);
      mkdirSync(temp, { recursive: true });
      child.kill("SIGTERM");
      const code = await new Promise((resolve) => child.once("exit", (c) => resolve(c)));
      expect(code).toBe(0);
      expect(existsSync(temp)).toBe(false);
      expect(out).toContain("removed the interrupted compile's temp dir");
    } finally {
      await hub.close();
      rmSync(tmp, { recursive: true, force: true });
    }
  });
});
