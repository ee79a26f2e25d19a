import { DType, GraphBuilder } from "./onnx-builder.ts";

/** Candidates per row the device returns: enough for top_k up to 63, top_logprobs (<= 20) and usual nuclei. */
export const NUM_CANDIDATES = 64;

/** Prefix sums run within blocks of this many tokens, then across blocks (see blockedCumSum). */
const BLOCK = 256;

/** min_p "off" as an offset: far below any logit, yet finite (no inf - inf). */
export const NO_MIN_P = -1e30;

/**
 * The sampling head: a graph of its own, run on the logits the model left on the device, and only in steps where
 * some row samples (ONNX Runtime runs every node of a graph whatever the run fetches). It computes where the logits
 * are what lets a step download O(rows × NUM_CANDIDATES) values instead of rows × vocab (the host sampler,
 * engine/device-sampler.ts, finishes from them). There is no random generator on the device: the host passes each
 * row's single uniform draw.
 *
 * Inputs: `logits` [S, vocab]; `inv_temperature` [S]; `uniform` [S] (the row's draw in [0, 1)); `min_p_offset` [S] =
 * temperature · ln(min_p), or NO_MIN_P.
 * Outputs:
 * - `cand_ids`, `cand_logits` [S, K]: the K best tokens by raw logit, best first (lower id first on ties, as ONNX
 *   TopK specifies); `cand_probs` [S, K]: their probabilities at the row's temperature;
 * - `lse` [S]: log-sum-exp of the raw logits (logprob = logit - lse);
 * - `kept_mass` [S]: probability mass of the tokens min_p keeps (all of them without min_p);
 * - `draw` [S]: the inverse-CDF draw over those tokens in id order, the first whose cumulative mass exceeds
 *   uniform · kept_mass (vocab when rounding left none: the host then falls back); `draw_logit` [S]: its raw logit.
 */
export function buildSamplingHead(vocabSize: number): Uint8Array {
  const g = new GraphBuilder();
  const V = vocabSize;
  const K = Math.min(NUM_CANDIDATES, V);
  const f32 = DType.float;
  const logits = g.input("logits", f32, ["S", V]);
  const invTemperature = g.input("inv_temperature", f32, ["S"]);
  const uniform = g.input("uniform", f32, ["S"]);
  const minPOffset = g.input("min_p_offset", f32, ["S"]);
  const column = (x: string) => g.op("Unsqueeze", [x, g.ints([1])]); // [S] -> [S, 1]
  const probs = g.op("Softmax", [g.op("Mul", [logits, column(invTemperature)])], { axis: -1 }); // at temperature

  const [candLogits, candIds] = g.node(
    "TopK",
    [logits, g.ints([K])],
    { axis: -1, largest: 1, sorted: 1 },
    { outputs: ["cand_logits", "cand_ids"] },
  );
  g.output("cand_logits", f32, ["S", K]);
  g.output("cand_ids", DType.int64, ["S", K]);
  g.op("GatherElements", [probs, candIds], { axis: 1 }, "cand_probs");
  g.output("cand_probs", f32, ["S", K]);
  g.op("ReduceLogSumExp", [logits, g.ints([1])], { keepdims: 0 }, "lse");
  g.output("lse", f32, ["S"]);

  // min_p keeps x >= max + T ln(min_p); the max is the first candidate
  const maxLogit = g.op("Slice", [candLogits, g.ints([0]), g.ints([1]), g.ints([1])]); // [S, 1]
  const keep = g.op("GreaterOrEqual", [logits, g.op("Add", [maxLogit, column(minPOffset)])]);
  const cdf = blockedCumSum(g, g.op("Mul", [probs, g.op("Cast", [keep], { to: f32 })]), V); // [S, blocks, BLOCK]
  const last = g.op("Slice", [cdf, g.ints([-1, -1]), g.ints([2 ** 31, 2 ** 31]), g.ints([1, 2])]); // [S, 1, 1]
  const kept = g.op("Reshape", [last, g.ints([-1])], {}, "kept_mass"); // [S]
  g.output("kept_mass", f32, ["S"]);
  // tokens whose cumulative mass is <= the target come before the drawn one (ReduceSum of int64 and Min of int64
  // have no WebGPU kernel: the count stays f32, exact below 2^24)
  const target = g.op("Reshape", [g.op("Mul", [uniform, kept]), g.ints([-1, 1, 1])]);
  const below = g.op("LessOrEqual", [cdf, target]);
  const count = g.op("ReduceSum", [g.op("Cast", [below], { to: f32 }), g.ints([1, 2])], { keepdims: 0 });
  g.op("Cast", [count], { to: DType.int64 }, "draw");
  g.output("draw", DType.int64, ["S"]);
  // unsqueezed before the cast: ONNX Runtime would put an int64 Unsqueeze on the CPU (a sync mid-graph)
  const drawIndex = g.op("Cast", [column(g.op("Min", [count, g.float(V - 1)]))], { to: DType.int64 }); // [S, 1]
  const drawLogit = g.op("GatherElements", [logits, drawIndex], { axis: 1 });
  g.op("Squeeze", [drawLogit, g.ints([1])], {}, "draw_logit");
  g.output("draw_logit", f32, ["S"]);
  return g.build("sampling_head");
}

/**
 * Inclusive prefix sums of x [S, V] along V, as [S, ceil(V / BLOCK), BLOCK] (zero-padded): within each block a
 * matrix product with an upper-triangular matrix of ones, then each block's offset, the sum of the blocks before
 * it, the same way. WebGPU's CumSum loops over every earlier element for each output, O(V²) per row; this is
 * O(V · BLOCK).
 */
function blockedCumSum(g: GraphBuilder, x: string, V: number): string {
  const blocks = Math.ceil(V / BLOCK);
  const ones = (n: number) => g.op("Expand", [g.float(1), g.ints([n, n])]);
  const padded = g.op("Pad", [x, g.ints([0, 0, 0, blocks * BLOCK - V])]);
  const x3 = g.op("Reshape", [padded, g.ints([0, blocks, BLOCK])]);
  const within = g.op("MatMul", [x3, g.op("Trilu", [ones(BLOCK)], { upper: 1 })]); // [S, blocks, BLOCK]
  const blockSums = g.op("ReduceSum", [x3, g.ints([2])], { keepdims: 0 }); // [S, blocks]
  const before = g.op("MatMul", [blockSums, g.op("Trilu", [ones(blocks), g.ints([1], true)], { upper: 1 })]);
  return g.op("Add", [within, g.op("Unsqueeze", [before, g.ints([2])])]);
}
