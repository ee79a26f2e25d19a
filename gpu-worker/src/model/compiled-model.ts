import { createHash } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import { checkCompiledDir, readCompiledManifest } from "./compiled-dir.ts";
import type { LlamaConfig } from "./config.ts";
import { cacheDir } from "./default-model.ts";
import { ModelLoadError } from "./errors.ts";
import {
  buildLlamaGraph,
  type EmbeddingWeight,
  type LinearWeight,
  type PackedWeights,
  ropeTables,
} from "./llama-graph.ts";
import type { ExternalRef } from "./onnx-builder.ts";
import {
  NonFiniteWeightError,
  QUANT_BLOCK_SIZE,
  type Quantization,
  quantizedRowBytes,
  quantizeRows,
} from "./quantize.ts";
import { f32BitsToF16Bits } from "./safetensors.ts";
import { LlamaWeights } from "./weights.ts";

/** Bump when the graph's weight layout or the packed file changes: old compiled caches are then ignored. */
export const COMPILER_VERSION = 4;

/**
 * Tensors start on 4 KiB boundaries: ONNX Runtime memory-maps an external initializer instead of copying it
 * only when its offset is page-aligned, which keeps a large model's weights out of the heap.
 */
const ALIGN = 4096;

/** Writes go out in chunks: Linux writes at most 0x7ffff000 bytes per call (a 2 GiB tensor would be cut short). */
const WRITE_CHUNK = 1 << 30;

export interface CompiledModel {
  /** The ONNX graph (small: weights are external). */
  graph: Uint8Array;
  /** Folder holding `weights.bin`, for ONNX Runtime's external-initializer lookup. */
  weightsDir: string;
  /** Bytes of `weights.bin` (what the weights take in memory once loaded). */
  weightBytes: number;
  /** Bytes one decode step reads: every layer's weights and the lm_head, not the embedding table (one row). */
  decodeBytesPerToken: number;
}

export interface CompileOptions {
  /** Weight format; default "none" (f32, exact). */
  quantization?: Quantization;
  /** Called as parameters are converted: (parameters done, parameters in all). */
  onProgress?: (done: number, total: number) => void;
  /** Write the packed weights here instead of the cache (`llama-worker compile --out`). */
  outDir?: string;
}

/**
 * Turn a Hugging Face checkpoint into what ONNX Runtime runs: the graph built from the config plus one packed
 * weights file (q/k/v and gate/up fused, rope tables precomputed). With `quantization` int8/int4 every linear
 * layer, lm_head included, is stored block-quantized for MatMulNBits and the embedding table as f16 (a gather
 * reads only the step's rows, so it is not worth quantizing); otherwise everything is f32. The source is read
 * one tensor at a time whatever its dtype, so peak memory is one tensor (in f32), not the model. The packed
 * file is cached under `<cache>/compiled/<key>`, keyed by the checkpoint's files and the format.
 */
export function compileModel(modelDir: string, cfg: LlamaConfig, opts: CompileOptions = {}): CompiledModel {
  // A directory `llama-worker compile` wrote (compiled-dir.ts): its weights are packed already, in its format.
  const manifest = readCompiledManifest(modelDir);
  if (manifest) {
    // "none" is every command's default: only an explicit int8/int4 can disagree with the directory.
    checkCompiledDir(
      modelDir,
      manifest,
      COMPILER_VERSION,
      opts.quantization === "none" ? undefined : opts.quantization,
    );
    const layout = packedLayout(cfg, manifest.quantization);
    return {
      graph: buildLlamaGraph(cfg, layout.refs),
      weightsDir: modelDir,
      weightBytes: layout.bytes,
      decodeBytesPerToken: layout.decodeBytes,
    };
  }
  const quantization = opts.quantization ?? "none";
  const weights = LlamaWeights.open(modelDir, cfg);
  const outDir = opts.outDir ?? join(cacheDir(), "compiled", cacheKey(cfg, weights, quantization));
  const layout = packedLayout(cfg, quantization);
  if (!existsSync(join(outDir, "weights.bin"))) {
    mkdirSync(dirname(outDir), { recursive: true });
    const tmp = `${outDir}.tmp-${process.pid}-${Date.now()}`;
    mkdirSync(tmp, { recursive: true });
    try {
      writePackedWeights(join(tmp, "weights.bin"), cfg, weights, layout, opts.onProgress);
      try {
        renameSync(tmp, outDir);
      } catch (e) {
        // Another process compiled the same checkpoint concurrently: theirs is identical.
        if (!existsSync(join(outDir, "weights.bin"))) throw e;
      }
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  }
  return {
    graph: buildLlamaGraph(cfg, layout.refs),
    weightsDir: outDir,
    weightBytes: layout.bytes,
    decodeBytesPerToken: layout.decodeBytes,
  };
}

function cacheKey(cfg: LlamaConfig, weights: LlamaWeights, quantization: Quantization): string {
  const h = createHash("sha256");
  h.update(JSON.stringify({ v: COMPILER_VERSION, cfg, quantization, block: QUANT_BLOCK_SIZE }));
  const files = [...new Set([...weights.tensors.values()].map((t) => t.file))].sort();
  for (const f of files) {
    const st = statSync(f);
    h.update(`${f}:${st.size}:${st.mtimeMs}`);
  }
  return h.digest("hex").slice(0, 24);
}

/** How one packed tensor is produced from the checkpoint. */
type Source =
  /** f32 (or f16) values of these checkpoint tensors, concatenated along their first axis */
  | { kind: "float"; names: string[]; dtype: "f32" | "f16" }
  /** these [rows, k] tensors quantized and concatenated along rows into data / scales / zero points */
  | { kind: "quantized"; names: string[]; k: number; bits: 4 | 8 }
  | { kind: "rope"; table: "cos" | "sin" };

interface Entry {
  source: Source;
  /** Where the output goes: one ref, or data / scales / zero points for a quantized matrix. */
  refs: ExternalRef[];
  /** Source parameters, for progress. */
  params: number;
}

function packedLayout(cfg: LlamaConfig, quantization: Quantization) {
  const entries: Entry[] = [];
  let offset = 0;
  const region = (length: number): ExternalRef => {
    const ref = { location: "weights.bin", offset, length };
    offset += Math.ceil(length / ALIGN) * ALIGN;
    return ref;
  };
  const bits = quantization === "int4" ? 4 : quantization === "int8" ? 8 : null;
  const H = cfg.hiddenSize;
  const I = cfg.intermediateSize;
  const hd = cfg.headDim;
  const floatTensor = (names: string[], numel: number, dtype: "f32" | "f16" = "f32"): ExternalRef => {
    const ref = region(numel * (dtype === "f16" ? 2 : 4));
    entries.push({ source: { kind: "float", names, dtype }, refs: [ref], params: numel });
    return ref;
  };
  /** A linear layer [n, k] from the concatenation of `names` along n. */
  const linear = (names: string[], n: number, k: number): LinearWeight => {
    if (bits === null) return { kind: "f32", weight: floatTensor(names, n * k) };
    const row = quantizedRowBytes(k, bits, QUANT_BLOCK_SIZE);
    const data = region(n * row.data);
    const scales = region(n * row.scales);
    const zeroPoints = bits === 4 ? region(n * row.zeroPoints) : null;
    entries.push({
      source: { kind: "quantized", names, k, bits },
      refs: zeroPoints ? [data, scales, zeroPoints] : [data, scales],
      params: n * k,
    });
    return { kind: "nbits", bits, blockSize: QUANT_BLOCK_SIZE, data, scales, zeroPoints };
  };

  const embed: EmbeddingWeight =
    bits === null
      ? { dtype: "f32", weight: floatTensor(["model.embed_tokens.weight"], cfg.vocabSize * H) }
      : { dtype: "f16", weight: floatTensor(["model.embed_tokens.weight"], cfg.vocabSize * H, "f16") };
  const layers: PackedWeights["layers"] = [];
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    const p = `model.layers.${l}`;
    const a = `${p}.self_attn`;
    const m = `${p}.mlp`;
    layers.push({
      inputNorm: floatTensor([`${p}.input_layernorm.weight`], H),
      wqkv: linear(
        [`${a}.q_proj.weight`, `${a}.k_proj.weight`, `${a}.v_proj.weight`],
        (cfg.numAttentionHeads + 2 * cfg.numKeyValueHeads) * hd,
        H,
      ),
      wo: linear([`${a}.o_proj.weight`], H, cfg.numAttentionHeads * hd),
      postNorm: floatTensor([`${p}.post_attention_layernorm.weight`], H),
      wgateUp: linear([`${m}.gate_proj.weight`, `${m}.up_proj.weight`], 2 * I, H),
      wdown: linear([`${m}.down_proj.weight`], H, I),
    });
  }
  const finalNorm = floatTensor(["model.norm.weight"], H);
  // Tied f32 models share the embedding's bytes; a quantized lm_head is its own copy (the embedding is f16).
  const headName = cfg.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  const lmHead: LinearWeight =
    bits === null && cfg.tieWordEmbeddings
      ? { kind: "f32", weight: embed.weight }
      : linear([headName], cfg.vocabSize, H);
  const rope = (table: "cos" | "sin") => {
    const ref = region(cfg.maxPositionEmbeddings * (hd / 2) * 4);
    entries.push({ source: { kind: "rope", table }, refs: [ref], params: 0 });
    return ref;
  };
  const ropeCos = rope("cos");
  const ropeSin = rope("sin");
  const notRead = new Set([embed.weight, ropeCos, ropeSin]);
  let decodeBytes = 0;
  for (const e of entries) for (const r of e.refs) if (!notRead.has(r)) decodeBytes += r.length;
  if (lmHead.kind === "f32" && lmHead.weight === embed.weight) decodeBytes += embed.weight.length; // tied: read whole
  return {
    refs: { embed, layers, finalNorm, lmHead, ropeCos, ropeSin } satisfies PackedWeights,
    entries,
    bytes: offset,
    decodeBytes,
  };
}

/** Positioned writes of whole buffers, in chunks (see WRITE_CHUNK). */
class PackedFile {
  constructor(readonly fd: number) {}

  write(bytes: Uint8Array, position: number): void {
    let done = 0;
    while (done < bytes.length) {
      done += writeSync(this.fd, bytes, done, Math.min(bytes.length - done, WRITE_CHUNK), position + done);
    }
  }
}

function asBytes(a: Float32Array | Uint16Array | Uint8Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function toF16(values: Float32Array): Uint16Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < bits.length; i++) out[i] = f32BitsToF16Bits(bits[i]);
  return out;
}

function writePackedWeights(
  file: string,
  cfg: LlamaConfig,
  weights: LlamaWeights,
  layout: { entries: Entry[] },
  onProgress?: (done: number, total: number) => void,
): void {
  const out = new PackedFile(openSync(file, "w"));
  const total = layout.entries.reduce((a, e) => a + e.params, 0);
  let done = 0;
  try {
    const rope = ropeTables(cfg);
    for (const e of layout.entries) {
      const pos = e.refs.map((r) => r.offset);
      const put = (i: number, bytes: Uint8Array) => {
        out.write(bytes, pos[i]);
        pos[i] += bytes.length;
      };
      const src = e.source;
      if (src.kind === "rope") put(0, asBytes(src.table === "cos" ? rope.cos : rope.sin));
      else
        for (const name of src.names) {
          const values = weights.readF32(name);
          // Attention scores are q·k / sqrt(head_dim): the scale is folded into q_proj once, here.
          if (name.endsWith(".self_attn.q_proj.weight")) scaleInPlace(values, 1 / Math.sqrt(cfg.headDim));
          if (src.kind === "float") put(0, asBytes(src.dtype === "f16" ? toF16(values) : values));
          else {
            const q = quantize(weights, name, values, src.k, src.bits);
            put(0, q.data);
            put(1, asBytes(q.scales));
            if (q.zeroPoints) put(2, q.zeroPoints);
          }
          done += values.length;
          onProgress?.(done, total);
        }
      e.refs.forEach((r, i) => {
        if (pos[i] - r.offset !== r.length) {
          throw new Error(
            `packed tensor at offset ${r.offset}: wrote ${pos[i] - r.offset} bytes, expected ${r.length}`,
          );
        }
      });
    }
    // The file ends where the last region does, padding included (regions are page-aligned).
  } finally {
    closeSync(out.fd);
  }
}

function scaleInPlace(values: Float32Array, factor: number): void {
  for (let i = 0; i < values.length; i++) values[i] *= factor;
}

function quantize(weights: LlamaWeights, name: string, values: Float32Array, k: number, bits: 4 | 8) {
  try {
    return quantizeRows(values, values.length / k, k, bits, QUANT_BLOCK_SIZE);
  } catch (e) {
    if (e instanceof NonFiniteWeightError) throw new ModelLoadError(weights.info(name).file, e.message, name);
    throw e;
  }
}
