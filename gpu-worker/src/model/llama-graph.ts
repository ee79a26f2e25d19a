import type { LlamaConfig } from "./config.ts";
import { DType, type ExternalRef, GraphBuilder } from "./onnx-builder.ts";

/**
 * The packed weights the graph reads, by packed name. Projections stay in Hugging Face's [out, in] layout and
 * run as Gemm(transB=1); q/k/v and gate/up are concatenated along `out` so each is one matrix multiply.
 */
export interface PackedWeights {
  /** [vocab, hidden] */
  embed: ExternalRef;
  layers: {
    /** [hidden] */
    inputNorm: ExternalRef;
    /** [(heads + 2 * kvHeads) * headDim, hidden] = concat(q_proj, k_proj, v_proj) */
    wqkv: ExternalRef;
    /** [hidden, heads * headDim] */
    wo: ExternalRef;
    /** [hidden] */
    postNorm: ExternalRef;
    /** [2 * intermediate, hidden] = concat(gate_proj, up_proj) */
    wgateUp: ExternalRef;
    /** [hidden, intermediate] */
    wdown: ExternalRef;
  }[];
  /** [hidden] */
  finalNorm: ExternalRef;
  /** [vocab, hidden]; the embedding matrix again when tie_word_embeddings */
  lmHead: ExternalRef;
  /** [maxPositions, headDim]: cos(pos * inv_freq) repeated for both rotate-half halves */
  ropeCos: ExternalRef;
  /** [maxPositions, headDim]: sin(...) with the first half negated, so rope(x) = x*cos + rotateHalf(x)*sin */
  ropeSin: ExternalRef;
}

/** The two attention groups of a step: decode tokens (one query each) and prefill chunks (many queries each). */
export const ATTENTION_GROUPS = ["decode", "prefill"] as const;
export type AttentionGroup = (typeof ATTENTION_GROUPS)[number];

/**
 * Build the LLaMA forward pass for one engine step over a ragged batch that reads a paged KV cache.
 *
 * Inputs (T = tokens in the step, across all sequences):
 * - `input_ids`, `positions` [T] int64
 * - `kv_cache` [2 * layers * slots, kvHeads * headDim]: the whole paged pool, read-only here (ONNX Runtime wraps
 *   the caller's buffer without copying). Layer l's keys are rows [2l * slots, (2l+1) * slots), values the next
 *   `slots` rows; slot = block * blockSize + offset.
 * - per attention group g (decode, prefill), G sequences padded to Q queries, P cached and N new keys:
 *   `g_query_index` [G, Q] (token rows), `g_past_slots` [G, P], `g_new_index` [G, N] (token rows whose fresh keys
 *   the sequence attends to), `g_mask` [G, Q, P + N] additive (0 or -1e9: padding and causality).
 * - `output_index` [T]: where each token's attention output sits in concat(decode rows, prefill rows).
 * - `logits_index` [S]: token rows that need next-token logits (the last token of each sampled sequence).
 *
 * Outputs: `logits` [S, vocab]; `new_kv` [2 * layers, T, kvHeads * headDim], the step's keys (after rope) and
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
  const kvCache = g.input("kv_cache", f32, ["kv_rows", kvDim]);
  const groups = ATTENTION_GROUPS.map((name) => {
    const mask = g.input(`${name}_mask`, f32, [`${name}_G`, `${name}_Q`, `${name}_K`]);
    // Score shapes from the mask's [G, Q, K]: [G, nkv, rep, Q, K] to add the mask, [G, nkv, rep*Q, K] to multiply.
    const maskShape = g.op("Shape", [mask]);
    const dimG = g.op("Slice", [maskShape, g.ints([0]), g.ints([1])]);
    const dimQK = g.op("Slice", [maskShape, g.ints([1]), g.ints([3])]);
    const dimK = g.op("Slice", [maskShape, g.ints([2]), g.ints([3])]);
    return {
      name,
      queryIndex: g.input(`${name}_query_index`, i64, [`${name}_G`, `${name}_Q`]),
      pastSlots: g.input(`${name}_past_slots`, i64, [`${name}_G`, `${name}_P`]),
      newIndex: g.input(`${name}_new_index`, i64, [`${name}_G`, `${name}_N`]),
      mask: g.op("Unsqueeze", [mask, g.ints([1, 2])]), // [G, 1, 1, Q, K]
      scoreShape5: g.op("Concat", [dimG, g.ints([nkv, rep]), dimQK], { axis: 0 }),
      scoreShape4: g.op("Concat", [dimG, g.ints([nkv, -1]), dimK], { axis: 0 }),
    };
  });
  const outputIndex = g.input("output_index", i64, ["T"]);
  const logitsIndex = g.input("logits_index", i64, ["S"]);

  // Weights
  const embed = g.external("embed_tokens", f32, [cfg.vocabSize, H], w.embed);
  const ropeCosTable = g.external("rope_cos", f32, [maxPos, hd], w.ropeCos);
  const ropeSinTable = g.external("rope_sin", f32, [maxPos, hd], w.ropeSin);

  // slots = kv_rows / (2 * layers): the pool size is a runtime property, not baked into the graph.
  const kvRows = g.op("Gather", [g.op("Shape", [kvCache]), g.ints([0], true)], { axis: 0 });
  const numSlots = g.op("Div", [kvRows, g.ints([2 * L], true)]);

  // Rotary tables for the step's positions: [T, 1, hd], broadcast over heads.
  const cos = g.op("Unsqueeze", [g.op("Gather", [ropeCosTable, positions], { axis: 0 }), g.ints([1])]);
  const sin = g.op("Unsqueeze", [g.op("Gather", [ropeSinTable, positions], { axis: 0 }), g.ints([1])]);
  const rope = (x: string, heads: number): string => {
    // x: [T, heads*hd] -> [T, heads, hd]; rope(x) = x*cos + concat(x2, x1)*sin  (sin has its first half negated)
    const x3 = g.op("Reshape", [x, g.ints([-1, heads, hd])]);
    const [x1, x2] = g.node("Split", [x3, g.ints([hd / 2, hd / 2])], { axis: -1 }, { numOutputs: 2 });
    const rotated = g.op("Concat", [x2, x1], { axis: -1 });
    const out = g.op("Add", [g.op("Mul", [x3, cos]), g.op("Mul", [rotated, sin])]);
    return g.op("Reshape", [out, g.ints([-1, heads * hd])]);
  };
  const rmsNorm = (x: string, weight: string): string =>
    g.op("RMSNormalization", [x, weight], { axis: -1, epsilon: { float: cfg.rmsNormEps } });
  const linear = (x: string, weight: string): string => g.op("Gemm", [x, weight], { transB: 1 });

  // x: [T, H] residual stream
  let x = g.op("Gather", [embed, ids], { axis: 0 });
  const newKv: string[] = [];
  for (let l = 0; l < L; l++) {
    const lw = w.layers[l];
    const p = `layers.${l}`;
    const inputNorm = g.external(`${p}.input_layernorm`, f32, [H], lw.inputNorm);
    const wqkv = g.external(`${p}.wqkv`, f32, [(nh + 2 * nkv) * hd, H], lw.wqkv);
    const wo = g.external(`${p}.wo`, f32, [H, nh * hd], lw.wo);
    const postNorm = g.external(`${p}.post_attention_layernorm`, f32, [H], lw.postNorm);
    const wgu = g.external(`${p}.wgate_up`, f32, [2 * cfg.intermediateSize, H], lw.wgateUp);
    const wdown = g.external(`${p}.wdown`, f32, [H, cfg.intermediateSize], lw.wdown);

    // attention: q, k, v for the step's tokens
    const qkv = linear(rmsNorm(x, inputNorm), wqkv);
    const [qRaw, kRaw, v] = g.node("Split", [qkv, g.ints([nh * hd, kvDim, kvDim])], { axis: -1 }, { numOutputs: 3 });
    // scale queries once here instead of every score: q / sqrt(hd)
    const q = g.op("Mul", [rope(qRaw, nh), g.float(1 / Math.sqrt(hd))]); // [T, nh*hd]
    const k = rope(kRaw, nkv); // [T, kvDim]
    newKv.push(k, v);

    const keyBase = g.op("Mul", [numSlots, g.ints([2 * l], true)]);
    const valueBase = g.op("Mul", [numSlots, g.ints([2 * l + 1], true)]);
    const groupOutputs = groups.map((grp) => {
      // queries [G, Q, nh*hd] -> [G, nkv, rep*Q, hd]
      const qg = g.op("Gather", [q, grp.queryIndex], { axis: 0 });
      const qh = g.op("Reshape", [
        g.op("Transpose", [g.op("Reshape", [qg, g.ints([0, 0, nkv, rep, hd])])], { perm: [0, 2, 3, 1, 4] }),
        g.ints([0, nkv, -1, hd]),
      ]);
      // keys/values [G, P + N, kvDim]: cached slots from the pool, then this step's fresh ones
      const gatherKv = (fresh: string, base: string) =>
        g.op(
          "Concat",
          [
            g.op("Gather", [kvCache, g.op("Add", [grp.pastSlots, base])], { axis: 0 }),
            g.op("Gather", [fresh, grp.newIndex], { axis: 0 }),
          ],
          { axis: 1 },
        );
      const keys = g.op("Reshape", [gatherKv(k, keyBase), g.ints([0, 0, nkv, hd])]);
      const values = g.op("Reshape", [gatherKv(v, valueBase), g.ints([0, 0, nkv, hd])]);
      const kT = g.op("Transpose", [keys], { perm: [0, 2, 3, 1] }); // [G, nkv, hd, K]
      const vh = g.op("Transpose", [values], { perm: [0, 2, 1, 3] }); // [G, nkv, K, hd]
      // scores [G, nkv, rep*Q, K] viewed as [G, nkv, rep, Q, K] so the [G, 1, 1, Q, K] mask broadcasts
      const scores = g.op("MatMul", [qh, kT]);
      const scores5 = g.op("Reshape", [scores, grp.scoreShape5]);
      const probs = g.op("Softmax", [g.op("Add", [scores5, grp.mask])], { axis: -1 });
      const ctx = g.op("MatMul", [g.op("Reshape", [probs, grp.scoreShape4]), vh]); // [G, nkv, rep*Q, hd]
      // back to token rows [G*Q, nh*hd]
      const ctx5 = g.op("Reshape", [ctx, g.ints([0, nkv, rep, -1, hd])]);
      return g.op("Reshape", [g.op("Transpose", [ctx5], { perm: [0, 3, 1, 2, 4] }), g.ints([-1, nh * hd])]);
    });
    const attn = g.op("Gather", [g.op("Concat", groupOutputs, { axis: 0 }), outputIndex], { axis: 0 }); // [T, nh*hd]
    x = g.op("Add", [x, linear(attn, wo)]);

    // SwiGLU feed-forward: down(silu(gate(h)) * up(h))
    const gu = linear(rmsNorm(x, postNorm), wgu);
    const [gate, up] = g.node(
      "Split",
      [gu, g.ints([cfg.intermediateSize, cfg.intermediateSize])],
      { axis: -1 },
      {
        numOutputs: 2,
      },
    );
    const act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]);
    x = g.op("Add", [x, linear(act, wdown)]);
  }

  // Only the rows that are sampled go through the final norm and the (large) vocabulary projection.
  const finalNorm = g.external("norm", f32, [H], w.finalNorm);
  const lmHead = g.external("lm_head", f32, [cfg.vocabSize, H], w.lmHead);
  const last = g.op("Gather", [x, logitsIndex], { axis: 0 });
  g.op("Gemm", [rmsNorm(last, finalNorm), lmHead], { transB: 1 }, "logits");
  g.output("logits", f32, ["S", cfg.vocabSize]);

  // new_kv [2L, T, kvDim]: layer l's keys at 2l, values at 2l+1
  g.op(
    "Concat",
    newKv.map((t) => g.op("Unsqueeze", [t, g.ints([0])])),
    { axis: 0 },
    "new_kv",
  );
  g.output("new_kv", f32, [2 * L, "T", kvDim]);
  return g.build("llama");
}

/**
 * Rotary tables in Hugging Face's rotate-half layout, with Llama 3 frequency scaling when configured.
 * Returns cos and sin [maxPositions, headDim] (sin's first half negated, see PackedWeights.ropeSin).
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
  const cos = new Float32Array(n * hd);
  const sin = new Float32Array(n * hd);
  for (let p = 0; p < n; p++) {
    for (let i = 0; i < half; i++) {
      // transformers computes the angle in float32: position * inv_freq
      const angle = Math.fround(p * invFreq[i]);
      const c = Math.cos(angle);
      const s = Math.sin(angle);
      cos[p * hd + i] = c;
      cos[p * hd + half + i] = c;
      sin[p * hd + i] = -s;
      sin[p * hd + half + i] = s;
    }
  }
  return { cos, sin };
}
