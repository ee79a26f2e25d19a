import type { LlamaConfig } from "./config.ts";
import { DType, type ExternalRef, GraphBuilder } from "./onnx-builder.ts";

/** A linear layer's weight [out, in]: f32 for Gemm(transB=1), or block-quantized for MatMulNBits. */
export type LinearWeight =
  | { kind: "f32"; weight: ExternalRef }
  | {
      kind: "nbits";
      bits: 4 | 8;
      blockSize: number;
      /** uint8 [out, blocks, blockSize * bits / 8] */
      data: ExternalRef;
      /** f32 [out * blocks] */
      scales: ExternalRef;
      /** uint8 packed 4-bit zero points; null for int8 (symmetric) */
      zeroPoints: ExternalRef | null;
    };

/** The embedding table [vocab, hidden], in f32 or f16 (gathered rows are widened to f32). */
export interface EmbeddingWeight {
  dtype: "f32" | "f16";
  weight: ExternalRef;
}

/**
 * The packed weights the graph reads, by packed name. Projections stay in Hugging Face's [out, in] layout;
 * q/k/v and gate/up are concatenated along `out` so each is one matrix multiply.
 */
export interface PackedWeights {
  /** [vocab, hidden] */
  embed: EmbeddingWeight;
  layers: {
    /** [hidden] */
    inputNorm: ExternalRef;
    /** [(heads + 2 * kvHeads) * headDim, hidden] = concat(q_proj, k_proj, v_proj) */
    wqkv: LinearWeight;
    /** [hidden, heads * headDim] */
    wo: LinearWeight;
    /** [hidden] */
    postNorm: ExternalRef;
    /** [2 * intermediate, hidden] = concat(gate_proj, up_proj) */
    wgateUp: LinearWeight;
    /** [hidden, intermediate] */
    wdown: LinearWeight;
  }[];
  /** [hidden] */
  finalNorm: ExternalRef;
  /** [vocab, hidden]; the f32 embedding matrix again when tie_word_embeddings and not quantized */
  lmHead: LinearWeight;
  /** [maxPositions, headDim / 2]: cos(pos * inv_freq), RotaryEmbedding's cos_cache */
  ropeCos: ExternalRef;
  /** [maxPositions, headDim / 2]: sin(pos * inv_freq), RotaryEmbedding's sin_cache */
  ropeSin: ExternalRef;
}

/**
 * MatMulNBits with int8 activations (accuracy_level 4): MLAS's fast path for both int4 and int8 weights on
 * x86-64 (issue 9's calibration: int4 1.22 ms vs 3.3 ms at level 0 for the bench shape; int8 at level 0 takes a
 * slow path, 435 ms).
 */
const NBITS_ACCURACY_LEVEL = 4;

/** The two attention groups of a step: decode tokens (one query each) and prefill chunks (many queries each). */
export const ATTENTION_GROUPS = ["decode", "prefill"] as const;
export type AttentionGroup = (typeof ATTENTION_GROUPS)[number];

/**
 * Build the LLaMA forward pass for one engine step over a ragged batch that reads a paged KV cache.
 *
 * Inputs (T = tokens in the step, across all sequences):
 * - `input_ids`, `positions` [T] int64
 * - `kv_cache.{l}` [2 * kvHeads * slots, headDim] for each layer l: the paged pool, one array per layer (so no
 *   single array outgrows a typed array's limit), read-only here (ONNX Runtime wraps the caller's buffer without
 *   copying). Row (kv * kvHeads + h) * slots + slot holds head h's key (kv = 0) or value (kv = 1) at that slot;
 *   slot = block * blockSize + offset. Head-major rows make a gather land directly in the [kvHeads, G, P, headDim]
 *   layout attention multiplies, with no transpose.
 * - per attention group g (decode, prefill), G sequences padded to Q queries, P cached and N new keys:
 *   `g_query_index` [G, Q] (token rows), `g_past_slots` [G, P], `g_new_index` [G, N] (token rows whose fresh keys
 *   the sequence attends to), `g_mask` [G, Q, P + N] additive (P ≥ 1; pad with a masked slot) (0 or -1e9: padding and causality).
 * - `output_index` [T]: where each token's attention output sits in concat(decode rows, prefill rows).
 * - `logits_index` [S]: token rows that need next-token logits (the last token of each sampled sequence).
 * - `inv_temperature` [S]: 1 / temperature of each sampled row (1 for greedy rows).
 *
 * Outputs: `logits` [S, vocab]; `argmax` [S] (the greedy token of each row); `logits_sum` [S]; `probs` [S, vocab] = softmax(logits * inv_temperature), which the sampler
 * draws from without an exp per vocabulary entry in JavaScript; `new_kv` [T, 2 * layers, kvHeads * headDim], the step's keys (after rope) and
 * values, which the caller writes into the pool at the tokens' slots. Nothing here scales with the pool size:
 * attention gathers only the slots of the sequences in the step.
 */
export function buildLlamaGraph(cfg: LlamaConfig, w: PackedWeights): Uint8Array {
  const g = new GraphBuilder();
  const H = cfg.hiddenSize;
  const nh = cfg.numAttentionHeads;
  const nkv = cfg.numKeyValueHeads;
  const hd = cfg.headDim;
  const rep = nh / nkv; // query heads per kv head (GQA)
  const kvDim = nkv * hd;
  const L = cfg.numHiddenLayers;
  const maxPos = cfg.maxPositionEmbeddings;
  const f32 = DType.float;
  const i64 = DType.int64;

  const ids = g.input("input_ids", i64, ["T"]);
  const positions = g.input("positions", i64, ["T"]);
  const kvCaches = Array.from({ length: L }, (_, l) => g.input(`kv_cache.${l}`, f32, ["kv_rows", hd]));
  // slots = kv_rows / (2 * kvHeads): the pool size is a runtime property, not baked into the graph.
  const kvRows = g.op("Gather", [g.op("Shape", [kvCaches[0]]), g.ints([0], true)], { axis: 0 });
  const numSlots = g.op("Div", [kvRows, g.ints([2 * nkv], true)]);
  const valueRowOffset = g.op("Mul", [numSlots, g.ints([nkv], true)]); // values follow the keys
  // row offset of head h within a layer's keys or values: h * slots, as [nkv, 1, 1] to broadcast over [G, P]
  const headOffsets = g.op("Mul", [g.ints(Array.from({ length: nkv }, (_, h) => h)), numSlots]);
  const headOffsets3 = g.op("Reshape", [headOffsets, g.ints([nkv, 1, 1])]);
  const groups = ATTENTION_GROUPS.map((name) => {
    const mask = g.input(`${name}_mask`, f32, [`${name}_G`, `${name}_Q`, `${name}_K`]);
    const pastSlots = g.input(`${name}_past_slots`, i64, [`${name}_G`, `${name}_P`]);
    const newIndex = g.input(`${name}_new_index`, i64, [`${name}_G`, `${name}_N`]);
    // Shapes from the inputs: scores are [nkv, G, rep*Q, K] to multiply and [nkv, G, rep, Q, K] to add the mask.
    const maskShape = g.op("Shape", [mask]);
    const dimG = g.op("Slice", [maskShape, g.ints([0]), g.ints([1])]);
    const dimQ = g.op("Slice", [maskShape, g.ints([1]), g.ints([2])]);
    const dimQK = g.op("Slice", [maskShape, g.ints([1]), g.ints([3])]);
    const dimK = g.op("Slice", [maskShape, g.ints([2]), g.ints([3])]);
    const dimRepQ = g.op("Mul", [dimQ, g.ints([rep])]);
    const dimP = g.op("Slice", [g.op("Shape", [pastSlots]), g.ints([1]), g.ints([2])]);
    const dimN = g.op("Slice", [g.op("Shape", [newIndex]), g.ints([1]), g.ints([2])]);
    const keyRows = g.op("Add", [headOffsets3, pastSlots]);
    return {
      name,
      queryIndex: g.input(`${name}_query_index`, i64, [`${name}_G`, `${name}_Q`]),
      newIndex,
      // rows of the past keys and values in every layer's array, head-major [nkv, G, P]
      keyRows,
      valueRows: g.op("Add", [keyRows, valueRowOffset]),
      mask: g.op("Unsqueeze", [mask, g.ints([0, 2])]), // [1, G, 1, Q, K]
      // Explicit shapes (no -1): a group with no sequence this step has G = 0, and its operators then do nothing.
      queryShape: g.op("Concat", [g.ints([nkv]), dimG, dimRepQ, g.ints([hd])], { axis: 0 }),
      scoreShape5: g.op("Concat", [g.ints([nkv]), dimG, g.ints([rep]), dimQK], { axis: 0 }),
      scoreShape4: g.op("Concat", [g.ints([nkv]), dimG, dimRepQ, dimK], { axis: 0 }),
      splitPN: g.op("Concat", [dimP, dimN], { axis: 0 }),
      ctxShape5: g.op("Concat", [g.ints([nkv]), dimG, g.ints([rep]), dimQ, g.ints([hd])], { axis: 0 }),
    };
  });
  const outputIndex = g.input("output_index", i64, ["T"]);
  const logitsIndex = g.input("logits_index", i64, ["S"]);
  const invTemperature = g.input("inv_temperature", f32, ["S"]);

  // Weights
  const embed = g.external(
    "embed_tokens",
    w.embed.dtype === "f16" ? DType.float16 : f32,
    [cfg.vocabSize, H],
    w.embed.weight,
  );
  const ropeCosTable = g.external("rope_cos", f32, [maxPos, hd / 2], w.ropeCos);
  const ropeSinTable = g.external("rope_sin", f32, [maxPos, hd / 2], w.ropeSin);
  // Each token is its own batch row of RotaryEmbedding: x [T, 1, heads * hd], position ids [T, 1].
  const positionIds = g.op("Unsqueeze", [positions, g.ints([1])]);
  /** Rotate-half rope (Hugging Face's layout) as one operator. */
  const rope = (x: string, heads: number): string =>
    g.op("RotaryEmbedding", [x, ropeCosTable, ropeSinTable, positionIds], { interleaved: 0, num_heads: heads });
  const rmsNorm = (x: string, weight: string): string =>
    g.op("RMSNormalization", [x, weight], { axis: -1, epsilon: { float: cfg.rmsNormEps } });
  /** The residual add and the next RMSNorm as one operator: [norm(x + branch), x + branch]. */
  const addAndNorm = (x: string, branch: string, weight: string): [string, string] => {
    const [normed, , , sum] = g.node(
      "SkipSimplifiedLayerNormalization",
      [x, branch, weight],
      { epsilon: { float: cfg.rmsNormEps } },
      { numOutputs: 4, domain: "com.microsoft" },
    );
    return [normed, sum];
  };
  /** x [rows, inFeatures] times the weight's transpose: [rows, outFeatures]. */
  const linear = (x: string, name: string, lw: LinearWeight, out: number, inFeatures: number, output?: string) => {
    if (lw.kind === "f32") {
      return g.op("Gemm", [x, g.external(name, f32, [out, inFeatures], lw.weight)], { transB: 1 }, output);
    }
    const blocks = Math.ceil(inFeatures / lw.blockSize);
    const inputs = [
      x,
      g.external(`${name}.q`, DType.uint8, [out, blocks, (lw.blockSize * lw.bits) / 8], lw.data),
      g.external(`${name}.scales`, f32, [out * blocks], lw.scales),
    ];
    if (lw.zeroPoints) {
      inputs.push(g.external(`${name}.zero_points`, DType.uint8, [lw.zeroPoints.length], lw.zeroPoints));
    }
    const attrs = { K: inFeatures, N: out, bits: lw.bits, block_size: lw.blockSize };
    return g.op("MatMulNBits", inputs, { ...attrs, accuracy_level: NBITS_ACCURACY_LEVEL }, output, "com.microsoft");
  };

  // x: [T, H] residual stream (an f16 table's rows are widened to f32)
  const embedded = g.op("Gather", [embed, ids], { axis: 0 });
  let x = w.embed.dtype === "f16" ? g.op("Cast", [embedded], { to: f32 }) : embedded;
  const newKv: string[] = [];
  const norms = w.layers.map((lw, l) => ({
    input: g.external(`layers.${l}.input_layernorm`, f32, [H], lw.inputNorm),
    post: g.external(`layers.${l}.post_attention_layernorm`, f32, [H], lw.postNorm),
  }));
  let normed = rmsNorm(x, norms[0].input); // later layers get theirs from the previous layer's addAndNorm
  for (let l = 0; l < L; l++) {
    const lw = w.layers[l];
    const p = `layers.${l}`;

    // attention: q, k, v for the step's tokens, [T, 1, features] for RotaryEmbedding. The q rows of wqkv are
    // pre-scaled by 1/sqrt(hd) at compile time, so scores need no scaling.
    const qkv = g.op("Unsqueeze", [linear(normed, `${p}.wqkv`, lw.wqkv, (nh + 2 * nkv) * hd, H), g.ints([1])]);
    const [qRaw, kRaw, v] = g.node("Split", [qkv, g.ints([nh * hd, kvDim, kvDim])], { axis: -1 }, { numOutputs: 3 });
    const q = rope(qRaw, nh); // [T, 1, nh*hd]
    const k = rope(kRaw, nkv); // [T, 1, kvDim]
    newKv.push(k, v);

    // this step's keys/values head-major [nkv, T, hd], shared by both groups
    const kFresh = g.op("Transpose", [g.op("Reshape", [k, g.ints([-1, nkv, hd])])], { perm: [1, 0, 2] });
    const vFresh = g.op("Transpose", [g.op("Reshape", [v, g.ints([-1, nkv, hd])])], { perm: [1, 0, 2] });
    const groupOutputs = groups.map((grp) => {
      // queries [G, Q, nh*hd] -> [nkv, G, rep*Q, hd]
      const qg = g.op("Reshape", [g.op("Gather", [q, grp.queryIndex], { axis: 0 }), g.ints([0, 0, nkv, rep, hd])]);
      const qh = g.op("Reshape", [g.op("Transpose", [qg], { perm: [2, 0, 3, 1, 4] }), grp.queryShape]);
      // past keys/values gathered from the pool [nkv, G, P, hd]; fresh ones from this step [nkv, G, N, hd]
      const kPast = g.op("Gather", [kvCaches[l], grp.keyRows], { axis: 0 });
      const vPast = g.op("Gather", [kvCaches[l], grp.valueRows], { axis: 0 });
      const kNew = g.op("Gather", [kFresh, grp.newIndex], { axis: 1 });
      const vNew = g.op("Gather", [vFresh, grp.newIndex], { axis: 1 });
      // scores q·kᵀ for past and fresh keys side by side: only scores are concatenated, never keys
      const scores = g.op(
        "Concat",
        [
          g.op("FusedMatMul", [qh, kPast], { transB: 1 }, undefined, "com.microsoft"),
          g.op("FusedMatMul", [qh, kNew], { transB: 1 }, undefined, "com.microsoft"),
        ],
        { axis: -1 },
      ); // [nkv, G, rep*Q, P+N]
      const probs5 = g.op("Softmax", [g.op("Add", [g.op("Reshape", [scores, grp.scoreShape5]), grp.mask])], {
        axis: -1,
      });
      const [pPast, pNew] = g.node(
        "Split",
        [g.op("Reshape", [probs5, grp.scoreShape4]), grp.splitPN],
        { axis: -1 },
        { numOutputs: 2 },
      );
      const ctx = g.op("Add", [g.op("MatMul", [pPast, vPast]), g.op("MatMul", [pNew, vNew])]); // [nkv, G, rep*Q, hd]
      // back to token rows [G*Q, nh*hd]
      const ctx5 = g.op("Reshape", [ctx, grp.ctxShape5]); // [nkv, G, rep, Q, hd]
      return g.op("Reshape", [g.op("Transpose", [ctx5], { perm: [1, 3, 0, 2, 4] }), g.ints([-1, nh * hd])]);
    });
    const attn = g.op("Gather", [g.op("Concat", groupOutputs, { axis: 0 }), outputIndex], { axis: 0 }); // [T, nh*hd]
    [normed, x] = addAndNorm(x, linear(attn, `${p}.wo`, lw.wo, H, nh * hd), norms[l].post);

    // SwiGLU feed-forward: down(silu(gate(h)) * up(h))
    const gu = linear(normed, `${p}.wgate_up`, lw.wgateUp, 2 * cfg.intermediateSize, H);
    const [gate, up] = g.node(
      "Split",
      [gu, g.ints([cfg.intermediateSize, cfg.intermediateSize])],
      { axis: -1 },
      {
        numOutputs: 2,
      },
    );
    const act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]);
    const down = linear(act, `${p}.wdown`, lw.wdown, H, cfg.intermediateSize);
    if (l + 1 < L) [normed, x] = addAndNorm(x, down, norms[l + 1].input);
    else x = g.op("Add", [x, down]); // the final norm runs on the sampled rows only
  }

  // Only the rows that are sampled go through the final norm and the (large) vocabulary projection.
  const finalNorm = g.external("norm", f32, [H], w.finalNorm);
  const last = g.op("Gather", [x, logitsIndex], { axis: 0 });
  // A tied f32 head reads the embedding's initializer itself (one copy of the table in memory).
  const tiedF32 = w.lmHead.kind === "f32" && w.lmHead.weight === w.embed.weight;
  const logits = tiedF32
    ? g.op("Gemm", [rmsNorm(last, finalNorm), embed], { transB: 1 }, "logits")
    : linear(rmsNorm(last, finalNorm), "lm_head", w.lmHead, cfg.vocabSize, H, "logits");
  g.output("logits", f32, ["S", cfg.vocabSize]);
  g.op("ArgMax", [logits], { axis: 1, keepdims: 0 }, "argmax"); // greedy tokens (first index on ties)
  g.output("argmax", DType.int64, ["S"]);
  // not finite iff the row holds a NaN or an infinity: lets the sampler fail just that row without scanning it
  g.op("ReduceSum", [logits, g.ints([1])], { keepdims: 0 }, "logits_sum");
  g.output("logits_sum", f32, ["S"]);
  const scaled = g.op("Mul", [logits, g.op("Unsqueeze", [invTemperature, g.ints([1])])]);
  g.op("Softmax", [scaled], { axis: -1 }, "probs");
  g.output("probs", f32, ["S", cfg.vocabSize]);

  // new_kv [T, 2L, kvDim]: layer l's keys at 2l, values at 2l+1 (each already [T, 1, kvDim])
  g.op("Concat", newKv, { axis: 1 }, "new_kv");
  g.output("new_kv", f32, ["T", 2 * L, kvDim]);
  return g.build("llama");
}

/**
 * Rotary tables in Hugging Face's rotate-half layout, with Llama 3 frequency scaling when configured.
 * Returns cos and sin [maxPositions, headDim / 2]: RotaryEmbedding's caches.
 */
export function ropeTables(cfg: LlamaConfig): { cos: Float32Array; sin: Float32Array } {
  const hd = cfg.headDim;
  const half = hd / 2;
  const invFreq = new Float32Array(half);
  for (let i = 0; i < half; i++) invFreq[i] = 1 / cfg.ropeTheta ** ((2 * i) / hd);
  const rs = cfg.ropeScaling;
  if (rs) {
    // transformers' _compute_llama3_parameters: long wavelengths are slowed by `factor`, short ones kept,
    // and the band between is interpolated smoothly.
    const lowFreqWavelen = rs.originalMaxPositionEmbeddings / rs.lowFreqFactor;
    const highFreqWavelen = rs.originalMaxPositionEmbeddings / rs.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const wavelen = (2 * Math.PI) / invFreq[i];
      if (wavelen > lowFreqWavelen) {
        invFreq[i] = invFreq[i] / rs.factor;
      } else if (wavelen >= highFreqWavelen) {
        const smooth =
          (rs.originalMaxPositionEmbeddings / wavelen - rs.lowFreqFactor) / (rs.highFreqFactor - rs.lowFreqFactor);
        invFreq[i] = (1 - smooth) * (invFreq[i] / rs.factor) + smooth * invFreq[i];
      }
    }
  }
  const n = cfg.maxPositionEmbeddings;
  const cos = new Float32Array(n * half);
  const sin = new Float32Array(n * half);
  for (let p = 0; p < n; p++) {
    for (let i = 0; i < half; i++) {
      // transformers computes the angle in float32: position * inv_freq
      const angle = Math.fround(p * invFreq[i]);
      const c = Math.cos(angle);
      const s = Math.sin(angle);
      cos[p * half + i] = c;
      sin[p * half + i] = s;
    }
  }
  return { cos, sin };
}
