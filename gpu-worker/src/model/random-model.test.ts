import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { loadLlamaConfig } from "./config.ts";
import { cacheDir, DEFAULT_MODEL_SHAPES, ensureDefaultModel } from "./default-model.ts";
import { type RandomModelOptions, writeRandomLlama } from "./random-model.ts";
import { LlamaWeights, llamaWeightSpecs } from "./weights.ts";

const root = mkdtempSync(join(tmpdir(), "random-model-test-"));
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});
let count = 0;
const fresh = () => join(root, `m${count++}`);

const GQA: RandomModelOptions = {
  config: {
    hidden_size: 32,
    intermediate_size: 64,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    vocab_size: 100,
  },
  seed: 42,
  tokenizer: "none",
};
const TIED: RandomModelOptions = {
  ...GQA,
  config: { ...GQA.config, num_key_value_heads: 1, tie_word_embeddings: true },
};

function files(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of readdirSync(dir).sort())
    out[f] = createHash("sha256")
      .update(readFileSync(join(dir, f)))
      .digest("hex");
  return out;
}

function std(a: Float32Array): number {
  let s = 0;
  for (const x of a) s += x * x;
  return Math.sqrt(s / a.length);
}

describe("writeRandomLlama", () => {
  it("is deterministic: same options, same bytes; another seed, other weights", () => {
    const a = fresh();
    const b = fresh();
    const c = fresh();
    writeRandomLlama(a, GQA);
    writeRandomLlama(b, GQA);
    writeRandomLlama(c, { ...GQA, seed: 43 });
    expect(files(a)).toEqual(files(b));
    expect(files(c)["model.safetensors"]).not.toBe(files(a)["model.safetensors"]);
    // Pinned: a change here means every machine's cached default model changes too (bump on purpose only).
    expect(files(a)["model.safetensors"]).toBe("0fc4d832fbeb97bbc40d5a9a23b33d03b5cebeda1c85ac15a29f7cc8151fbbf7");
  });

  it("writes a GQA checkpoint that loads back through loadLlamaConfig and LlamaWeights.open", () => {
    const dir = fresh();
    writeRandomLlama(dir, { ...GQA, dtype: "F16" });
    const cfg = loadLlamaConfig(dir);
    expect(cfg).toMatchObject({ hiddenSize: 32, numKeyValueHeads: 2, headDim: 8, bosTokenId: 1, eosTokenIds: [2] });
    expect(cfg.torchDtype).toBe("float16");
    const raw = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
    expect(raw).toMatchObject({
      model_type: "llama",
      architectures: ["LlamaForCausalLM"],
      bos_token_id: 1,
      eos_token_id: 2,
    });
    expect(JSON.parse(readFileSync(join(dir, "generation_config.json"), "utf8"))).toMatchObject({ eos_token_id: 2 });
    expect(readFileSync(join(dir, "README.md"), "utf8")).toMatch(/random[\s\S]*meaningless/);

    const w = LlamaWeights.open(dir, cfg);
    expect(w.dtype).toBe("F16");
    // The scales the init promises: projections 1/sqrt(fan_in), norms 1 ± 0.1, embeddings 1.
    expect(std(w.readF32("model.layers.0.self_attn.k_proj.weight")) * Math.sqrt(32)).toBeCloseTo(1, 0);
    expect(std(w.readF32("model.layers.1.mlp.down_proj.weight")) * Math.sqrt(64)).toBeCloseTo(1, 0);
    expect(std(w.readF32("model.embed_tokens.weight"))).toBeCloseTo(1, 0);
    for (const x of w.readF32("model.layers.0.input_layernorm.weight")) expect(Math.abs(x - 1)).toBeLessThan(0.4);
  });

  it("writes a tied checkpoint without lm_head that loads back", () => {
    const dir = fresh();
    writeRandomLlama(dir, { ...TIED, dtype: "BF16" });
    const cfg = loadLlamaConfig(dir);
    expect(cfg.tieWordEmbeddings).toBe(true);
    const w = LlamaWeights.open(dir, cfg);
    expect(w.dtype).toBe("BF16");
    expect(w.tensors.size).toBe(llamaWeightSpecs(cfg).length);
    const header = readFileSync(join(dir, "model.safetensors")).toString("latin1", 8, 4096);
    expect(header).not.toContain("lm_head");
  });

  it("shards hold the same weights as one file, with a consistent index", () => {
    const one = fresh();
    const three = fresh();
    writeRandomLlama(one, GQA);
    writeRandomLlama(three, { ...GQA, shards: 3 });
    expect(existsSync(join(three, "model.safetensors"))).toBe(false);
    const shardFiles = readdirSync(three).filter((f) => f.endsWith(".safetensors"));
    expect(shardFiles.sort()).toEqual([1, 2, 3].map((i) => `model-0000${i}-of-00003.safetensors`));
    const index = JSON.parse(readFileSync(join(three, "model.safetensors.index.json"), "utf8"));
    expect(new Set(Object.values(index.weight_map))).toEqual(new Set(shardFiles));

    const cfg = loadLlamaConfig(one);
    const a = LlamaWeights.open(one, cfg);
    const b = LlamaWeights.open(three, cfg);
    const totalBytes = [...b.tensors.values()].reduce((s, t) => s + t.byteLength, 0);
    expect(index.metadata.total_size).toBe(totalBytes);
    for (const name of a.tensors.keys()) expect(b.readF32(name), name).toEqual(a.readF32(name));
  });

  it("reports progress up to the parameter count", () => {
    const calls: [number, number][] = [];
    writeRandomLlama(fresh(), GQA, (done, total) => calls.push([done, total]));
    const total = 2 * 100 * 32 + 2 * (2 * 32 + 32 * 32 * 2 + 16 * 32 * 2 + 3 * 64 * 32) + 32;
    expect(calls.at(-1)).toEqual([total, total]);
    for (let i = 1; i < calls.length; i++) expect(calls[i][0]).toBeGreaterThanOrEqual(calls[i - 1][0]);
  });

  it("writes the Llama-2 tokenizer for a 32000-token vocabulary and refuses it for others", () => {
    const dir = fresh();
    writeRandomLlama(dir, { config: { hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1 }, seed: 1 });
    const tok = JSON.parse(readFileSync(join(dir, "tokenizer.json"), "utf8"));
    expect(Object.keys(tok.model.vocab)).toHaveLength(32000);
    expect(existsSync(join(dir, "tokenizer_config.json"))).toBe(true);
    expect(() => writeRandomLlama(fresh(), { ...GQA, tokenizer: "llama2" })).toThrow(/32000/);
  });

  it("refuses to write into a non-empty directory", () => {
    const dir = fresh();
    mkdirSync(dir);
    writeFileSync(join(dir, "model.safetensors"), "precious");
    expect(() => writeRandomLlama(dir, GQA)).toThrow(/not empty/);
    expect(readFileSync(join(dir, "model.safetensors"), "utf8")).toBe("precious");
  });
});

describe("ensureDefaultModel", () => {
  it("generates the stories15M-shaped model once, atomically, even with concurrent callers", async () => {
    const prev = process.env.LLAMA_EDGE_CACHE_DIR;
    process.env.LLAMA_EDGE_CACHE_DIR = join(root, "cache");
    try {
      expect(cacheDir()).toBe(join(root, "cache"));
      const [a, b] = await Promise.all([ensureDefaultModel("default", { quiet: true }), ensureDefaultModel()]);
      expect(a).toBe(join(root, "cache", "models", "stories15m-random"));
      expect(b).toBe(a);
      expect(readdirSync(join(root, "cache", "models"))).toEqual(["stories15m-random"]); // no temp dirs left
      const cfg = loadLlamaConfig(a);
      expect(cfg).toMatchObject({ hiddenSize: 288, intermediateSize: 768, numHiddenLayers: 6, vocabSize: 32000 });
      expect(cfg.maxPositionEmbeddings).toBe(DEFAULT_MODEL_SHAPES.default.max_position_embeddings);
      expect(LlamaWeights.open(a, cfg).tensors.has("lm_head.weight")).toBe(true);
      expect(existsSync(join(a, "tokenizer.json"))).toBe(true);
      expect(await ensureDefaultModel("default", { quiet: true })).toBe(a);
    } finally {
      if (prev === undefined) delete process.env.LLAMA_EDGE_CACHE_DIR;
      else process.env.LLAMA_EDGE_CACHE_DIR = prev;
    }
  });
});
