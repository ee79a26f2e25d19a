import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { describe, expect, it } from "vitest";
import { compileModel } from "../model/compiled-model.ts";
import { loadLlamaConfig } from "../model/config.ts";
import { ensureDefaultModel } from "../model/default-model.ts";
import { ExecutionProviderError, ModelRunner } from "./model-runner.ts";

// Where onnxruntime-node keeps the CUDA provider once it is installed (it ships the CPU build only).
const ortDir = dirname(createRequire(import.meta.url).resolve("onnxruntime-node/package.json"));
const cudaInstalled = existsSync(join(ortDir, "bin", "napi-v6", "linux", "x64", "libonnxruntime_providers_cuda.so"));

describe("ModelRunner", () => {
  it.skipIf(cudaInstalled)("says how to install the CUDA provider when --device cuda cannot load it", async () => {
    const dir = await ensureDefaultModel("default", { quiet: true });
    const cfg = loadLlamaConfig(dir);
    const create = ModelRunner.create(compileModel(dir, cfg), cfg, {
      numBlocks: 4,
      blockSize: 16,
      executionProvider: "cuda",
    });
    await expect(create).rejects.toThrow(ExecutionProviderError);
    await expect(create).rejects.toThrow(/ONNXRUNTIME_NODE_INSTALL=true/);
  });
});
