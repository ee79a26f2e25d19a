/**
 * Batched token sampling, one `sampleBatch` call per engine step (parameters come validated, see
 * sampling-params.ts; each row draws from its own generator, see seeded-rng.ts).
 *
 * Order per row, as vLLM v1 applies it: logit_bias, penalties (repetition over prompt+output, presence and
 * frequency over output), then temperature (0 = greedy argmax), min_p, top_k, top_p, and one draw from the
 * row's generator. Filters are thresholds over the row, so nothing is sorted except, for top_p, the few
 * tokens at the edge of the nucleus. Returned logprobs come from the raw logits (vLLM's default).
 *
 * A row with a grammar bitmask (constrained decoding, see grammar.ts) is sampled from a copy of its logits where
 * every disallowed token is -Infinity, before anything else, as vLLM applies the mask to the model's logits; its
 * logprobs are those of the masked row.
 *
 * @module
 */

import type { SeededRng } from "./seeded-rng.ts";
import type { SamplingParams } from "./types.ts";

export interface SamplingRow {
  params: SamplingParams;
  /** per-request generator; advanced exactly once per sampled token (null: Math.random, for tests and greedy) */
  rng: SeededRng | null;
  promptTokenIds: readonly number[];
  outputTokenIds: readonly number[];
  /** Grammar bitmask: bit `id % 32` of word `id >> 5` set iff token `id` may be sampled (greedy included). */
  allowedTokens?: Int32Array;
}

export interface SampledToken {
  tokenId: number;
  /** Raw-logit log-softmax of tokenId; present when the request asked for logprobs. */
  logprob?: number;
  /** The topLogprobs best tokens by raw logit, best first (lower id first on ties). */
  topLogprobs?: { tokenId: number; logprob: number }[];
  error?: undefined;
}

/** A row that could not be sampled (non-finite logits, a failure in its processing). Only that row fails. */
export interface SamplingFailure {
  tokenId: -1;
  error: string;
}

/** What the model computed alongside the logits, when it did (the engine's graph does). */
export interface ModelSideOutputs {
  /**
   * softmax(logits / temperature) per row, computed in one vectorised op: rows whose logits no bias or penalty
   * changes then draw from it with no exp per token.
   */
  probs?: Float32Array;
  /** Each row's argmax: greedy rows with unedited logits take it as their token. */
  argmax?: BigInt64Array;
  /** Each row's sum of logits: not finite when the row holds a NaN or an infinity (one check per row, no scan). */
  rowSums?: Float32Array;
}

/** vLLM treats temperatures below this as greedy. */
const GREEDY_EPS = 1e-5;

// exp(z) for z <= 0 from a table of exp(-i/32) and a degree-5 Taylor step (relative error ~1e-12): about twice
// as fast as Math.exp, which dominates sampling time at 128k vocab. Below -104, exp underflows float32 anyway.
const EXP_STEPS = 32;
const EXP_LEN = EXP_STEPS * 104;
const EXP_TABLE = Float64Array.from({ length: EXP_LEN + 1 }, (_, i) => Math.exp(-i / EXP_STEPS));
/** top_p histogram: one bin per exp-table step (1/32 nat below the max), so the table index is the bin. */
const NUM_BINS = EXP_LEN;

/**
 * Sum of exp((x - m) * invT) over the row (all x <= m). Module-level bindings are copied to locals first: in
 * ESM each read of one inside a hot loop costs a TDZ check (measured: twice as slow).
 */
function sumExp(row: Float32Array, m: number, invT: number): number {
  const table = EXP_TABLE;
  const len = EXP_LEN;
  const scale = invT * EXP_STEPS;
  const step = 1 / EXP_STEPS;
  let sum = 0;
  for (let j = 0; j < row.length; j++) {
    const t = (m - row[j]) * scale;
    if (t < len) {
      const i = t | 0;
      const d = (i - t) * step;
      sum += table[i] * (1 + d * (1 + d * (0.5 + d * (1 / 6 + d * (1 / 24 + d / 120)))));
    }
  }
  return sum;
}

/** Up to this k, top_k uses a heap pass; above it, quickselect on a copy of the row. */
const MAX_HEAP_K = 2048;

/** Reusable per-vocab buffers, so a step allocates nothing proportional to the vocabulary. */
class Scratch {
  readonly cand: Int32Array; // candidate token ids, ascending
  readonly weight: Float64Array; // exp((x - max) / T) of each candidate
  readonly bin: Uint16Array; // top_p histogram bin of each candidate
  readonly edge: Int32Array; // candidate indices in the top_p edge bin
  readonly copy: Float32Array; // quickselect workspace
  readonly flags: Uint8Array; // per token: SAVED | REPEATED
  readonly counts: Int32Array; // per token: occurrences in the output
  readonly masked: Float32Array; // a grammar-masked row
  readonly binMass = new Float64Array(NUM_BINS);
  readonly heap = new Float64Array(MAX_HEAP_K);
  /** Sum of weight[0..n) after weighCandidates. */
  total = 0;
  /** Tokens whose logits this row edited in place, with their raw values, to restore afterwards. */
  savedIds: number[] = [];
  savedRaw: number[] = [];

  constructor(readonly vocabSize: number) {
    this.cand = new Int32Array(vocabSize);
    this.weight = new Float64Array(vocabSize);
    this.bin = new Uint16Array(vocabSize);
    this.edge = new Int32Array(vocabSize);
    this.copy = new Float32Array(vocabSize);
    this.flags = new Uint8Array(vocabSize);
    this.counts = new Int32Array(vocabSize);
    this.masked = new Float32Array(vocabSize);
  }
}

const SAVED = 1;
const REPEATED = 2;
let scratch: Scratch | null = null;

/**
 * Samples one token for each row of `logits` ([rows.length, vocabSize], row-major). Logits are edited in place
 * while a row is processed and restored before returning, so the caller's buffer is unchanged.
 *
 * @example
 * const [t] = sampleBatch(logits, 32000, [{ params, rng: SeededRng.forSeed(params.seed), promptTokenIds, outputTokenIds: [] }]);
 */
export function sampleBatch(
  logits: Float32Array,
  vocabSize: number,
  rows: SamplingRow[],
  model: ModelSideOutputs = {},
): (SampledToken | SamplingFailure)[] {
  if (logits.length < rows.length * vocabSize) {
    throw new RangeError(`sampleBatch: ${logits.length} logits for ${rows.length} rows of ${vocabSize}`);
  }
  if (scratch === null || scratch.vocabSize !== vocabSize) scratch = new Scratch(vocabSize);
  const { probs, argmax, rowSums } = model;
  return rows.map((r, i) => {
    if (rowSums !== undefined && !Number.isFinite(rowSums[i])) {
      return { tokenId: -1, error: "the model produced non-finite logits (NaN or infinity) for this sequence" };
    }
    try {
      const t = sampleRow(
        logits.subarray(i * vocabSize, (i + 1) * vocabSize),
        r,
        scratch ?? new Scratch(vocabSize),
        probs?.subarray(i * vocabSize, (i + 1) * vocabSize),
        argmax === undefined ? undefined : Number(argmax[i]),
      );
      if (!Number.isInteger(t.tokenId) || t.tokenId < 0 || t.tokenId >= vocabSize) {
        return { tokenId: -1, error: `sampling produced no valid token (got ${t.tokenId}); the logits are not finite` };
      }
      return t;
    } catch (e) {
      scratch = null; // a row that threw may have left marks in the shared buffers
      return { tokenId: -1, error: `sampling failed: ${e instanceof Error ? e.message : String(e)}` };
    }
  });
}

function sampleRow(
  row: Float32Array,
  r: SamplingRow,
  s: Scratch,
  probs?: Float32Array,
  rowArgmax?: number,
): SampledToken {
  if (r.allowedTokens !== undefined) {
    // The model's probs and argmax describe the unmasked row: a masked row never takes those shortcuts.
    row = maskedCopy(row, r.allowedTokens, s.masked);
    probs = undefined;
    rowArgmax = undefined;
  }
  const p = r.params;
  const raw = p.logprobs || p.topLogprobs > 0 ? rawLogprobs(row, p.topLogprobs) : null;
  let tokenId: number;
  try {
    applyBiasAndPenalties(row, r, s);
    const u = r.rng === null ? Math.random() : r.rng.next();
    // the model's probs and argmax match the row only while nothing edited it (no logit_bias, no penalty)
    const unedited = s.savedIds.length === 0;
    const rowProbs = unedited ? probs : undefined;
    if (p.temperature < GREEDY_EPS) tokenId = unedited && rowArgmax !== undefined ? rowArgmax : argmax(row);
    else tokenId = sampleFiltered(row, p, u, s, rowProbs);
  } finally {
    restore(row, s);
  }
  const out: SampledToken = { tokenId };
  if (raw !== null) out.logprob = row[tokenId] - raw.lse;
  if (p.topLogprobs > 0 && raw !== null) {
    out.topLogprobs = raw.top.map((id) => ({ tokenId: id, logprob: row[id] - raw.lse }));
  }
  return out;
}

/** `row` with every token the bitmask disallows set to -Infinity, written into `out`. */
function maskedCopy(row: Float32Array, mask: Int32Array, out: Float32Array): Float32Array {
  const V = row.length;
  out.set(row);
  let any = 0;
  for (let w = 0, base = 0; base < V; w++, base += 32) {
    const bits = w < mask.length ? mask[w] : 0;
    any |= bits;
    if (bits === -1) continue;
    const end = Math.min(base + 32, V);
    if (bits === 0) out.fill(Number.NEGATIVE_INFINITY, base, end);
    else for (let id = base; id < end; id++) if (((bits >>> (id - base)) & 1) === 0) out[id] = Number.NEGATIVE_INFINITY;
  }
  if (any === 0) throw new RangeError("the grammar bitmask allows no token");
  return out;
}

function save(row: Float32Array, id: number, s: Scratch): void {
  if (s.flags[id] & SAVED) return;
  s.flags[id] |= SAVED;
  s.savedIds.push(id);
  s.savedRaw.push(row[id]);
}

function restore(row: Float32Array, s: Scratch): void {
  for (let i = 0; i < s.savedIds.length; i++) {
    const id = s.savedIds[i];
    row[id] = s.savedRaw[i];
    s.flags[id] = 0;
    s.counts[id] = 0;
  }
  s.savedIds = [];
  s.savedRaw = [];
}

/** logit_bias, then vLLM's penalties: repetition (prompt+output), frequency and presence (output only). */
function applyBiasAndPenalties(row: Float32Array, r: SamplingRow, s: Scratch): void {
  const p = r.params;
  const V = row.length;
  for (const key in p.logitBias) {
    const id = Number(key);
    save(row, id, s);
    row[id] += p.logitBias[id];
  }
  if (p.repetitionPenalty !== 1) {
    const rp = p.repetitionPenalty;
    for (const ids of [r.promptTokenIds, r.outputTokenIds]) {
      for (const id of ids) {
        if (id < 0 || id >= V || s.flags[id] & REPEATED) continue;
        save(row, id, s);
        s.flags[id] |= REPEATED;
        const x = row[id];
        row[id] = x > 0 ? x / rp : x * rp;
      }
    }
  }
  if (p.frequencyPenalty !== 0 || p.presencePenalty !== 0) {
    const distinct: number[] = [];
    for (const id of r.outputTokenIds) {
      if (id < 0 || id >= V) continue;
      if (s.counts[id]++ === 0) distinct.push(id);
    }
    for (const id of distinct) {
      save(row, id, s); // also gets counts[id] reset by restore()
      row[id] -= p.frequencyPenalty * s.counts[id] + p.presencePenalty;
    }
  }
}

/** First index of the maximum (lowest id wins ties). */
function argmax(row: Float32Array): number {
  let best = 0;
  let m = row[0];
  for (let j = 1; j < row.length; j++) {
    if (row[j] > m) {
      m = row[j];
      best = j;
    }
  }
  return best;
}

/** log-sum-exp of the raw row, and its `k` best token ids (best first, lower id first on ties), in one pass. */
function rawLogprobs(row: Float32Array, k: number): { lse: number; top: number[] } {
  const top = topTokens(row, Math.max(1, k));
  const m = row[top[0]];
  return { lse: m + Math.log(sumExp(row, m, 1)), top: top.slice(0, k) };
}

/** The k best token ids by value, best first, lower id first on ties (k is small: at most 20). */
function topTokens(row: Float32Array, k: number): number[] {
  const ids: number[] = [];
  let worst = Number.NEGATIVE_INFINITY; // value of ids[k - 1] once k are held
  for (let j = 0; j < row.length; j++) {
    const x = row[j];
    // Scanning ids upward, an equal value never beats an earlier one, so the test is strict.
    if (ids.length === k && x <= worst) continue;
    let i = ids.length === k ? k - 1 : ids.length;
    while (i > 0 && row[ids[i - 1]] < x) {
      if (i < k) ids[i] = ids[i - 1];
      i--;
    }
    ids[i] = j;
    if (ids.length === k) worst = row[ids[k - 1]];
  }
  return ids;
}

/**
 * Temperature, min_p, top_k and top_p as thresholds, then one inverse-CDF draw over the kept tokens in id order.
 * `u` is the row's single uniform draw.
 */
function sampleFiltered(row: Float32Array, p: SamplingParams, u: number, s: Scratch, probs?: Float32Array): number {
  const V = row.length;
  const onlyTemperatureAndTopP = !(p.topK > 0 && p.topK < V) && p.minP <= 0;
  if (probs !== undefined && onlyTemperatureAndTopP) {
    if (p.topP >= 1) return drawFrom(probs, u);
    const id = nucleusDraw(probs, row, p.topP, u, s);
    if (id >= 0) return id;
  }
  const invT = 1 / p.temperature;
  // top_k keeps x >= the k-th largest value (ties kept); min_p keeps p >= minP * pmax, i.e. x >= m + T ln(minP).
  let thr = -Infinity;
  let m: number;
  if (p.topK > 0 && p.topK < V) [thr, m] = topKThreshold(row, p.topK, s);
  else m = row[argmax(row)];
  if (p.minP > 0) thr = Math.max(thr, m + p.temperature * Math.log(p.minP));

  const { cand, weight, bin } = s;
  const useTopP = p.topP < 1;
  const n = weighCandidates(row, thr, m, invT, useTopP, s, probs);
  const total = s.total;

  if (!useTopP) {
    const target = u * total;
    let acc = 0;
    for (let i = 0; i < n; i++) {
      acc += weight[i];
      if (acc > target) return cand[i];
    }
    return cand[n - 1]; // rounding left target at the very top
  }

  const cut = topPCut(row, n, total, p.topP, s);
  const target = u * cut.keptMass;
  let acc = 0;
  let last = -1;
  for (let i = 0; i < n; i++) {
    const b = bin[i];
    if (b > cut.edgeBin) continue;
    const id = cand[i];
    if (b === cut.edgeBin) {
      const x = row[id];
      if (x < cut.x || (x === cut.x && id > cut.id)) continue;
    }
    acc += weight[i];
    last = id;
    if (acc > target) return id;
  }
  return last;
}

/**
 * Collects the tokens with x >= thr into s.cand (ascending) with weights exp((x - m) / T) in s.weight, their
 * sum in s.total and, for top_p, each one's histogram bin. Returns their number.
 */
function weighCandidates(
  row: Float32Array,
  thr: number,
  m: number,
  invT: number,
  useTopP: boolean,
  s: Scratch,
  probs?: Float32Array,
): number {
  const { cand, weight, bin, binMass } = s;
  if (useTopP) binMass.fill(0);
  // t = (m - x) / T in table steps, shared by exp and the top_p histogram (both 1/32 nat). Tokens whose weight
  // underflows to 0 can never be drawn and carry no mass, so they are not candidates.
  const scale = invT * EXP_STEPS;
  // Hot loop: module-level bindings are copied to locals, as in sumExp.
  const table = EXP_TABLE;
  const len = EXP_LEN;
  const step = 1 / EXP_STEPS;
  const V = row.length;
  let n = 0;
  let total = 0;
  for (let j = 0; j < V; j++) {
    const x = row[j];
    const t = (m - x) * scale;
    if (x >= thr && t < len) {
      const i = t | 0;
      const d = (i - t) * step;
      // probs[j] is the same weight up to the row's normaliser, computed by the model
      const w =
        probs !== undefined ? probs[j] : table[i] * (1 + d * (1 + d * (0.5 + d * (1 / 6 + d * (1 / 24 + d / 120)))));
      cand[n] = j;
      weight[n] = w;
      total += w;
      if (useTopP) {
        bin[n] = i;
        binMass[i] += w;
      }
      n++;
    }
  }
  s.total = total;
  return n;
}

/**
 * vLLM's top_p: walking tokens from least to most likely, drop each one while the dropped mass including it is
 * <= (1 - topP) of the total; the most likely token always stays. The histogram built by sampleFiltered finds
 * the bin where dropping stops; only that bin is sorted. Every token of a lower bin is dropped, every token of a
 * higher bin kept, and in the edge bin the kept ones are those ranked at or above (x, id).
 */
function topPCut(
  row: Float32Array,
  n: number,
  total: number,
  topP: number,
  s: Scratch,
): { edgeBin: number; x: number; id: number; keptMass: number } {
  const { cand, weight, bin, binMass, edge } = s;
  const budget = (1 - topP) * total;
  let dropped = 0;
  let edgeBin = 0;
  for (let b = NUM_BINS - 1; b >= 0; b--) {
    if (dropped + binMass[b] > budget) {
      edgeBin = b;
      break;
    }
    dropped += binMass[b];
  }
  let numEdge = 0;
  for (let i = 0; i < n; i++) if (bin[i] === edgeBin) edge[numEdge++] = i;
  // Ascending likelihood; on equal logits the higher id counts as less likely (cand is ascending in i).
  const sorted = edge.subarray(0, numEdge).sort((a, b) => row[cand[a]] - row[cand[b]] || b - a);
  let k = 0;
  while (k < numEdge - 1 && dropped + weight[sorted[k]] <= budget) dropped += weight[sorted[k++]];
  const id = cand[sorted[k]];
  return { edgeBin, x: row[id], id, keptMass: total - dropped };
}

/** Nucleus candidates beyond this many go to the histogram path (flat distributions), which needs no sort. */
const MAX_NUCLEUS_SORT = 2048;

/**
 * top_p straight from the model's probabilities, for the usual peaked distribution. Every token with
 * probability <= (1 - topP) / V is dropped by vLLM's rule anyway (together they hold at most 1 - topP, and they
 * are the least likely), so only the rest is sorted. Returns -1 when too many remain (the caller then uses the
 * histogram path). Same rule, tie order and id-ordered draw as topPCut + sampleFiltered.
 */
function nucleusDraw(probs: Float32Array, row: Float32Array, topP: number, u: number, s: Scratch): number {
  const V = probs.length;
  const floor = (1 - topP) / V;
  const { cand, edge } = s;
  let n = 0;
  let dropped = 0;
  for (let j = 0; j < V; j++) {
    const q = probs[j];
    if (q > floor) {
      if (n === MAX_NUCLEUS_SORT) return -1;
      cand[n++] = j;
    } else dropped += q;
  }
  // ascending likelihood; on equal logits the higher id counts as less likely (as topPCut)
  const sorted = edge.subarray(0, n);
  for (let i = 0; i < n; i++) sorted[i] = cand[i];
  sorted.sort((a, b) => row[a] - row[b] || b - a);
  const budget = 1 - topP;
  let k = 0;
  while (k < n - 1 && dropped + probs[sorted[k]] <= budget) dropped += probs[sorted[k++]];
  const cutX = row[sorted[k]];
  const cutId = sorted[k];
  // draw over the kept tokens in id order
  let kept = 0;
  for (let i = 0; i < n; i++) {
    const id = cand[i];
    const x = row[id];
    if (x > cutX || (x === cutX && id <= cutId)) kept += probs[id];
  }
  const target = u * kept;
  let acc = 0;
  let last = cutId;
  for (let i = 0; i < n; i++) {
    const id = cand[i];
    const x = row[id];
    if (x < cutX || (x === cutX && id > cutId)) continue;
    acc += probs[id];
    last = id;
    if (acc > target) return id;
  }
  return last;
}

/** Inverse-CDF draw from a normalised distribution: the first token whose cumulative probability exceeds u. */
function drawFrom(probs: Float32Array, u: number): number {
  let acc = 0;
  let last = 0;
  for (let j = 0; j < probs.length; j++) {
    const q = probs[j];
    if (q <= 0) continue;
    acc += q;
    last = j;
    if (acc > u) return j;
  }
  return last; // the probabilities summed to a hair under u
}

/** [k-th largest value of row (counting duplicates), max of row]. */
function topKThreshold(row: Float32Array, k: number, s: Scratch): [number, number] {
  if (k > MAX_HEAP_K) {
    const a = s.copy;
    a.set(row);
    return [quickselect(a, row.length - k), row[argmax(row)]];
  }
  // Min-heap of the k largest seen so far; most values fail the first comparison.
  const h = s.heap;
  let size = 0;
  for (let j = 0; j < row.length; j++) {
    const x = row[j];
    if (size < k) {
      let i = size++;
      while (i > 0) {
        const parent = (i - 1) >> 1;
        if (h[parent] <= x) break;
        h[i] = h[parent];
        i = parent;
      }
      h[i] = x;
    } else if (x > h[0]) {
      siftDown(h, size, x);
    }
  }
  let m = h[0];
  for (let i = 1; i < size; i++) if (h[i] > m) m = h[i];
  return [h[0], m];
}

/** Replaces the heap's root with x and restores the min-heap property. */
function siftDown(h: Float64Array, size: number, x: number): void {
  let i = 0;
  for (;;) {
    let c = 2 * i + 1;
    if (c >= size) break;
    if (c + 1 < size && h[c + 1] < h[c]) c++;
    if (h[c] >= x) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = x;
}

/** The value that would sit at index `kth` if `a` were sorted ascending; reorders `a`. */
function quickselect(a: Float32Array, kth: number): number {
  let lo = 0;
  let hi = a.length - 1;
  while (hi > lo) {
    const mid = (lo + hi) >> 1;
    const pivot = median3(a[lo], a[mid], a[hi]);
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] < pivot) i++;
      while (a[j] > pivot) j--;
      if (i <= j) {
        const t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    if (kth <= j) hi = j;
    else if (kth >= i) lo = i;
    else return a[kth];
  }
  return a[kth];
}

function median3(a: number, b: number, c: number): number {
  return Math.max(Math.min(a, b), Math.min(Math.max(a, b), c));
}
