/**
 * One step's graph inputs from the scheduled sequences: token ids and positions, the two attention groups
 * (decode, prefill) with their past slots and masks, and the rows that need logits. Shared by every backend; each
 * adds its own KV cache inputs (see llama-graph.ts).
 *
 * @module
 */
import * as ort from "onnxruntime-node";

/** One sequence's share of a step: the tokens it computes now and where its KV lives. */
export interface StepSequence {
  /** Tokens computed in this step: a prefill chunk, or the one token appended last step (decode). */
  tokenIds: readonly number[];
  /** Position of tokenIds[0]; equals the number of tokens whose KV is already in the cache. */
  startPos: number;
  /** Physical blocks covering positions [0, startPos + tokenIds.length). */
  blockTable: readonly number[];
  /** Whether to return next-token logits after this chunk (false for a prefill chunk that is not the last). */
  needLogits: boolean;
}

export interface StepInputs {
  /** input_ids, positions, {decode,prefill}_{query_index,past_slots,new_index,mask}, output_index, logits_index */
  feeds: Record<string, ort.Tensor>;
  /** T: tokens in the step, across all sequences. */
  numTokens: number;
  /** S: rows that need logits. */
  numRows: number;
  /** [T] the cache slot each token's key and value go to, in step order. */
  newSlots: BigInt64Array;
}

/** -1e9 rather than -Infinity: a fully masked (padding) row then softmaxes to finite garbage, never NaN. */
const MASKED = -1e9;

/** Cache slot of position `pos`: block * blockSize + offset. */
export function slotOf(blockTable: readonly number[], pos: number, blockSize: number): number {
  const block = blockTable[Math.floor(pos / blockSize)];
  if (block === undefined) throw new Error(`block table too short for position ${pos}`);
  return block * blockSize + (pos % blockSize);
}

/**
 * @param opts.padEmptyGroups run an empty attention group as one dummy row (query = key = token 0, masked, never
 *   read back) instead of on empty tensors: WebGPU kernels refuse a dispatch of zero workgroups.
 */
export function buildStepInputs(
  seqs: readonly StepSequence[],
  blockSize: number,
  opts: { padEmptyGroups?: boolean } = {},
): StepInputs {
  let T = 0;
  for (const s of seqs) T += s.tokenIds.length;
  const inputIds = new BigInt64Array(T);
  const positions = new BigInt64Array(T);
  const newSlots = new BigInt64Array(T);
  const tokenRow: number[] = []; // first token row of each sequence
  let row = 0;
  for (const s of seqs) {
    tokenRow.push(row);
    for (let i = 0; i < s.tokenIds.length; i++) {
      inputIds[row + i] = BigInt(s.tokenIds[i]);
      positions[row + i] = BigInt(s.startPos + i);
      newSlots[row + i] = BigInt(slotOf(s.blockTable, s.startPos + i, blockSize));
    }
    row += s.tokenIds.length;
  }

  const decode: number[] = [];
  const prefill: number[] = [];
  for (const [i, s] of seqs.entries()) (s.tokenIds.length === 1 ? decode : prefill).push(i);
  const outputIndex = new BigInt64Array(T);
  const feeds: Record<string, ort.Tensor> = {};
  let outBase = 0;
  for (const [name, members] of [
    ["decode", decode],
    ["prefill", prefill],
  ] as const) {
    // An empty group has G = 0: its operators run on empty tensors and cost next to nothing.
    const G = opts.padEmptyGroups ? Math.max(1, members.length) : members.length;
    let Q = 1;
    let P = 1; // at least one (masked) past slot keeps every tensor non-empty
    for (const i of members) {
      Q = Math.max(Q, seqs[i].tokenIds.length);
      P = Math.max(P, seqs[i].startPos);
    }
    const K = P + Q;
    const queryIndex = new BigInt64Array(G * Q);
    const pastSlots = new BigInt64Array(G * P);
    const mask = new Float32Array(G * Q * K).fill(MASKED);
    members.forEach((i, gi) => {
      const s = seqs[i];
      const n = s.tokenIds.length;
      for (let q = 0; q < n; q++) {
        queryIndex[gi * Q + q] = BigInt(tokenRow[i] + q);
        outputIndex[tokenRow[i] + q] = BigInt(outBase + gi * Q + q);
      }
      for (let p = 0; p < s.startPos; p++) pastSlots[gi * P + p] = BigInt(slotOf(s.blockTable, p, blockSize));
      // query q sees every cached position and the fresh tokens up to itself (causal)
      for (let q = 0; q < n; q++) {
        const m = (gi * Q + q) * K;
        mask.fill(0, m, m + s.startPos);
        mask.fill(0, m + P, m + P + q + 1);
      }
    });
    outBase += G * Q;
    feeds[`${name}_query_index`] = new ort.Tensor("int64", queryIndex, [G, Q]);
    feeds[`${name}_past_slots`] = new ort.Tensor("int64", pastSlots, [G, P]);
    // the keys a sequence adds this step are its own query tokens
    feeds[`${name}_new_index`] = new ort.Tensor("int64", queryIndex, [G, Q]);
    feeds[`${name}_mask`] = new ort.Tensor("float32", mask, [G, Q, K]);
  }

  const logitRows: bigint[] = [];
  seqs.forEach((s, i) => {
    if (s.needLogits) logitRows.push(BigInt(tokenRow[i] + s.tokenIds.length - 1));
  });
  feeds.input_ids = new ort.Tensor("int64", inputIds, [T]);
  feeds.positions = new ort.Tensor("int64", positions, [T]);
  feeds.output_index = new ort.Tensor("int64", outputIndex, [T]);
  feeds.logits_index = new ort.Tensor("int64", BigInt64Array.from(logitRows), [logitRows.length]);
  return { feeds, numTokens: T, numRows: logitRows.length, newSlots };
}
