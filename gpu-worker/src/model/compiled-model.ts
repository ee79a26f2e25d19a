import { createHash } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import type { LlamaConfig } from "./config.ts";
import { cacheDir } from "./default-model.ts";
import { buildLlamaGraph, type PackedWeights, ropeTables } from "./llama-graph.ts";
import type { ExternalRef } from "./onnx-builder.ts";
import { LlamaWeights } from "./weights.ts";

/** Bump when the graph or the packed layout changes: old compiled caches are then ignored. */
const COMPILER_VERSION = 2;

export interface CompiledModel {
  /** The ONNX graph (small: weights are external). */
  graph: Uint8Array;
  /** Folder holding `weights.bin`, for ONNX Runtime's external-initializer lookup. */
  weightsDir: string;
  /** Where each packed tensor sits in weights.bin, for backends that build their own variant of the graph. */
  weights: PackedWeights;
}

/**
 * Turn a Hugging Face checkpoint into what ONNX Runtime runs: the graph built from the config plus one packed
 * f32 weights file (q/k/v and gate/up fused, rope tables precomputed). The packed file is cached under
 * `<cache>/compiled/<key>` keyed by the checkpoint's files, so it is written once per checkpoint.
 */
export function compileModel(
  modelDir: string,
  cfg: LlamaConfig,
  opts: { onProgress?: (done: number, total: number) => void } = {},
): CompiledModel {
  const weights = LlamaWeights.open(modelDir, cfg);
  const key = cacheKey(cfg, weights);
  const outDir = join(cacheDir(), "compiled", key);
  const layout = packedLayout(cfg);
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
  return { graph: buildLlamaGraph(cfg, layout.refs), weightsDir: outDir, weights: layout.refs };
}

function cacheKey(cfg: LlamaConfig, weights: LlamaWeights): string {
  const h = createHash("sha256");
  h.update(JSON.stringify({ v: COMPILER_VERSION, cfg }));
  const files = [...new Set([...weights.tensors.values()].map((t) => t.file))].sort();
  for (const f of files) {
    const st = statSync(f);
    h.update(`${f}:${st.size}:${st.mtimeMs}`);
  }
  return h.digest("hex").slice(0, 24);
}

interface Entry {
  ref: ExternalRef;
  /** Hugging Face tensor names concatenated (along the first axis) into this packed tensor, or a rope table. */
  sources: string[] | "rope_cos" | "rope_sin";
}

function packedLayout(cfg: LlamaConfig): { refs: PackedWeights; entries: Entry[] } {
  const entries: Entry[] = [];
  let offset = 0;
  const add = (numel: number, sources: Entry["sources"]): ExternalRef => {
    const ref = { location: "weights.bin", offset, length: numel * 4 };
    // 64-byte alignment keeps every tensor SIMD- and mmap-friendly.
    offset += Math.ceil((numel * 4) / 64) * 64;
    entries.push({ ref, sources });
    return ref;
  };
  const H = cfg.hiddenSize;
  const I = cfg.intermediateSize;
  const hd = cfg.headDim;
  const embed = add(cfg.vocabSize * H, ["model.embed_tokens.weight"]);
  const layers: PackedWeights["layers"] = [];
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    const p = `model.layers.${l}`;
    layers.push({
      inputNorm: add(H, [`${p}.input_layernorm.weight`]),
      wqkv: add((cfg.numAttentionHeads + 2 * cfg.numKeyValueHeads) * hd * H, [
        `${p}.self_attn.q_proj.weight`,
        `${p}.self_attn.k_proj.weight`,
        `${p}.self_attn.v_proj.weight`,
      ]),
      wo: add(H * cfg.numAttentionHeads * hd, [`${p}.self_attn.o_proj.weight`]),
      postNorm: add(H, [`${p}.post_attention_layernorm.weight`]),
      wgateUp: add(2 * I * H, [`${p}.mlp.gate_proj.weight`, `${p}.mlp.up_proj.weight`]),
      wdown: add(H * I, [`${p}.mlp.down_proj.weight`]),
    });
  }
  const finalNorm = add(H, ["model.norm.weight"]);
  const lmHead = cfg.tieWordEmbeddings ? embed : add(cfg.vocabSize * H, ["lm_head.weight"]);
  const ropeCos = add(cfg.maxPositionEmbeddings * hd, "rope_cos");
  const ropeSin = add(cfg.maxPositionEmbeddings * hd, "rope_sin");
  return { refs: { embed, layers, finalNorm, lmHead, ropeCos, ropeSin }, entries };
}

function writePackedWeights(
  file: string,
  cfg: LlamaConfig,
  weights: LlamaWeights,
  layout: { entries: Entry[] },
  onProgress?: (done: number, total: number) => void,
): void {
  const fd = openSync(file, "w");
  try {
    const rope = ropeTables(cfg);
    const total = layout.entries.length;
    let done = 0;
    for (const e of layout.entries) {
      let pos = e.ref.offset;
      const write = (data: Float32Array) => {
        writeSync(fd, new Uint8Array(data.buffer, data.byteOffset, data.byteLength), 0, data.byteLength, pos);
        pos += data.byteLength;
      };
      if (e.sources === "rope_cos") write(rope.cos);
      else if (e.sources === "rope_sin") write(rope.sin);
      else for (const name of e.sources) write(weights.readF32(name));
      if (pos - e.ref.offset !== e.ref.length) {
        throw new Error(
          `packed tensor at offset ${e.ref.offset}: wrote ${pos - e.ref.offset} bytes, expected ${e.ref.length}`,
        );
      }
      onProgress?.(++done, total);
    }
  } finally {
    closeSync(fd);
  }
}
