import { mkdtempSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { expectLoadError } from "../../test/expect-load-error.ts";
import { loadLlamaConfig, parseLlamaConfig } from "./config.ts";
import { type SafetensorsDtype, type SafetensorsTensor, writeSafetensors } from "./safetensors.ts";
import { LlamaWeights, llamaWeightSpecs } from "./weights.ts";

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "weights-test-"));
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** hidden 32, 4 heads of 8, 2 kv heads, 2 layers, vocab 50. */
const GQA = {
  model_type: "llama",
  architectures: ["LlamaForCausalLM"],
  hidden_size: 32,
  intermediate_size: 48,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 50,
};

interface Tweaks {
  /** name -> replacement shape */
  shapes?: Record<string, number[]>;
  drop?: string[];
  extra?: SafetensorsTensor[];
  /** dtype per tensor; default F32 */
  dtype?: (name: string) => SafetensorsDtype;
}

/** A checkpoint dir whose tensors follow the spec (value = element index / 1000), with tweaks applied. */
function writeCheckpoint(fields: Record<string, unknown>, tweaks: Tweaks = {}, specsFrom = fields): void {
  writeFileSync(join(dir, "config.json"), JSON.stringify(fields));
  const specs = llamaWeightSpecs(parseLlamaConfig(specsFrom));
  const tensors: SafetensorsTensor[] = specs
    .filter((s) => !tweaks.drop?.includes(s.name))
    .map((s) => {
      const shape = tweaks.shapes?.[s.name] ?? s.shape;
      const n = shape.reduce((a, b) => a * b, 1);
      const data = Float32Array.from({ length: n }, (_, i) => (i % 1000) / 1000);
      return { name: s.name, dtype: tweaks.dtype?.(s.name) ?? "F32", shape, data };
    });
  writeSafetensors(join(dir, "model.safetensors"), [...tensors, ...(tweaks.extra ?? [])]);
}

describe("llamaWeightSpecs", () => {
  it("lists the Hugging Face names and shapes, with GQA-sized k/v", () => {
    const specs = llamaWeightSpecs(parseLlamaConfig(GQA));
    expect(specs).toHaveLength(1 + 9 * 2 + 2);
    const shape = Object.fromEntries(specs.map((s) => [s.name, s.shape]));
    expect(shape["model.embed_tokens.weight"]).toEqual([50, 32]);
    expect(shape["model.layers.1.input_layernorm.weight"]).toEqual([32]);
    expect(shape["model.layers.1.self_attn.q_proj.weight"]).toEqual([32, 32]);
    expect(shape["model.layers.1.self_attn.k_proj.weight"]).toEqual([16, 32]);
    expect(shape["model.layers.1.self_attn.v_proj.weight"]).toEqual([16, 32]);
    expect(shape["model.layers.1.self_attn.o_proj.weight"]).toEqual([32, 32]);
    expect(shape["model.layers.1.post_attention_layernorm.weight"]).toEqual([32]);
    expect(shape["model.layers.1.mlp.gate_proj.weight"]).toEqual([48, 32]);
    expect(shape["model.layers.1.mlp.up_proj.weight"]).toEqual([48, 32]);
    expect(shape["model.layers.1.mlp.down_proj.weight"]).toEqual([32, 48]);
    expect(shape["model.norm.weight"]).toEqual([32]);
    expect(shape["lm_head.weight"]).toEqual([50, 32]);
  });

  it("uses head_dim when the config gives one, and omits lm_head when tied", () => {
    const specs = llamaWeightSpecs(parseLlamaConfig({ ...GQA, head_dim: 16, tie_word_embeddings: true }));
    const shape = Object.fromEntries(specs.map((s) => [s.name, s.shape]));
    expect(shape["model.layers.0.self_attn.q_proj.weight"]).toEqual([64, 32]);
    expect(shape["model.layers.0.self_attn.k_proj.weight"]).toEqual([32, 32]);
    expect(shape["model.layers.0.self_attn.o_proj.weight"]).toEqual([32, 64]);
    expect(shape["lm_head.weight"]).toBeUndefined();
  });
});

describe("LlamaWeights.open", () => {
  it("opens a valid checkpoint, ignores extra tensors and reads f32", () => {
    const invFreq = { name: "model.layers.0.self_attn.rotary_emb.inv_freq", dtype: "F32" as const, shape: [4] };
    writeCheckpoint(GQA, { extra: [{ ...invFreq, data: new Float32Array(4) }] });
    const cfg = loadLlamaConfig(dir);
    const w = LlamaWeights.open(dir, cfg);
    expect([...w.tensors.keys()]).toEqual(llamaWeightSpecs(cfg).map((s) => s.name));
    expect(w.dtype).toBe("F32");
    expect(w.info("model.norm.weight").shape).toEqual([32]);
    const k = w.readF32("model.layers.1.self_attn.k_proj.weight");
    expect(k.length).toBe(16 * 32);
    expect(k[3]).toBeCloseTo(0.003, 7);
    expectLoadError(
      () => w.info(invFreq.name),
      "(tensor model.layers.0.self_attn.rotary_emb.inv_freq)",
      "not a tensor",
    );
  });

  it("ignores lm_head.weight in a tied checkpoint", () => {
    const tied = { ...GQA, tie_word_embeddings: true };
    writeCheckpoint(tied, {}, GQA); // written with lm_head, as some exporters do
    const w = LlamaWeights.open(dir, loadLlamaConfig(dir));
    expect(w.tensors.has("lm_head.weight")).toBe(false);
    expect(w.tensors.has("model.embed_tokens.weight")).toBe(true);
  });

  it("reports the dtype holding most parameters", () => {
    writeCheckpoint(GQA, { dtype: (n) => (n.endsWith("norm.weight") ? "F32" : "BF16") });
    const w = LlamaWeights.open(dir, loadLlamaConfig(dir));
    expect(w.dtype).toBe("BF16");
    expect(w.info("model.norm.weight").dtype).toBe("F32");
  });

  it("shape mismatch names the file, tensor, both shapes and the config field", () => {
    const q = "model.layers.1.self_attn.q_proj.weight";
    writeCheckpoint(GQA, { shapes: { [q]: [64, 32] } });
    const e = expectLoadError(
      () => LlamaWeights.open(dir, loadLlamaConfig(dir)),
      join(dir, "model.safetensors"),
      `(tensor ${q})`,
      "shape [64, 32]",
      "expected [32, 32]",
      "num_attention_heads*head_dim = 4*8",
    );
    expect(e.tensor).toBe(q);
  });

  it("a tensor of the wrong rank is a shape mismatch too", () => {
    writeCheckpoint(GQA, { shapes: { "model.norm.weight": [1, 32] } });
    expectLoadError(
      () => LlamaWeights.open(dir, loadLlamaConfig(dir)),
      "(tensor model.norm.weight)",
      "[1, 32]",
      "hidden_size",
    );
  });

  it("missing tensor", () => {
    const name = "model.layers.1.mlp.down_proj.weight";
    writeCheckpoint(GQA, { drop: [name] });
    expectLoadError(
      () => LlamaWeights.open(dir, loadLlamaConfig(dir)),
      join(dir, "model.safetensors"),
      `(tensor ${name})`,
      "missing tensor",
      "[32, 48]",
    );
  });

  it("a checkpoint for more layers than it has", () => {
    writeCheckpoint({ ...GQA, num_hidden_layers: 3 }, {}, GQA);
    expectLoadError(
      () => LlamaWeights.open(dir, loadLlamaConfig(dir)),
      "(tensor model.layers.2.input_layernorm.weight)",
    );
  });

  it("truncated safetensors file", () => {
    writeCheckpoint(GQA);
    const file = join(dir, "model.safetensors");
    truncateSync(file, statSync(file).size - 100);
    expectLoadError(() => LlamaWeights.open(dir, loadLlamaConfig(dir)), file, "(tensor lm_head.weight)", "truncated");
  });

  it("unknown dtype", () => {
    writeFileSync(join(dir, "config.json"), JSON.stringify(GQA));
    const header = { "model.norm.weight": { dtype: "I8", shape: [32], data_offsets: [0, 32] } };
    const json = Buffer.from(JSON.stringify(header));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    writeFileSync(join(dir, "model.safetensors"), Buffer.concat([len, json, Buffer.alloc(32)]));
    expectLoadError(
      () => LlamaWeights.open(dir, loadLlamaConfig(dir)),
      "(tensor model.norm.weight)",
      '"I8"',
      "F32, F16, BF16",
    );
  });

  it("no safetensors in the directory", () => {
    writeFileSync(join(dir, "config.json"), JSON.stringify(GQA));
    expectLoadError(() => LlamaWeights.open(dir, loadLlamaConfig(dir)), dir, "no model.safetensors");
  });

  it("missing directory", () => {
    const missing = join(dir, "nope");
    expectLoadError(() => loadLlamaConfig(missing), join(missing, "config.json"), "not found");
    expectLoadError(() => LlamaWeights.open(missing, parseLlamaConfig(GQA)), missing, "not found");
  });

  it("unsupported model_type and architecture are rejected with the config file named", () => {
    writeCheckpoint({ ...GQA, model_type: "mistral" }, {}, GQA);
    expectLoadError(() => loadLlamaConfig(dir), join(dir, "config.json"), '"mistral"');
    writeFileSync(join(dir, "config.json"), JSON.stringify({ ...GQA, architectures: ["MistralForCausalLM"] }));
    expectLoadError(() => loadLlamaConfig(dir), join(dir, "config.json"), "MistralForCausalLM");
  });

  it("pre-quantized checkpoints fail with one line naming what is unsupported", () => {
    writeCheckpoint({ ...GQA, quantization_config: { quant_method: "gptq", bits: 4 } }, {}, GQA);
    expectLoadError(() => loadLlamaConfig(dir), join(dir, "config.json"), '"gptq"', "--quantization int8 or int4");
    // GPTQ-style tensors without a quantization_config: an I32 qweight, or an F16 scale-like tensor
    const qweight = "model.layers.0.self_attn.q_proj.qweight";
    writeFileSync(join(dir, "config.json"), JSON.stringify(GQA));
    const header = { [qweight]: { dtype: "I32", shape: [4, 32], data_offsets: [0, 512] } };
    const json = Buffer.from(JSON.stringify(header));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    writeFileSync(join(dir, "model.safetensors"), Buffer.concat([len, json, Buffer.alloc(512)]));
    expectLoadError(() => LlamaWeights.open(dir, loadLlamaConfig(dir)), `(tensor ${qweight})`, "pre-quantized");
    const gIdx = "model.layers.0.self_attn.q_proj.g_idx";
    writeCheckpoint(GQA, { extra: [{ name: gIdx, dtype: "F32", shape: [32], data: new Float32Array(32) }] });
    expectLoadError(() => LlamaWeights.open(dir, loadLlamaConfig(dir)), `(tensor ${gIdx})`, "GPTQ");
  });
});
