import { describe, expect, test, vi } from "vitest";
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
