/**
 * Sampling from what the device computed (model/sampling-head.ts): the row's argmax, its best NUM_CANDIDATES
 * tokens, and an inverse-CDF draw over the whole vocabulary. Same rules, order and tie-breaking as sampler.ts
 * (temperature, min_p, top_k, top_p, one uniform draw per token, logprobs from the raw logits); a row the
 * candidates cannot settle exactly (logit_bias or penalties, top_k beyond the candidates, a nucleus wider than them)
 * returns null and goes to sampler.ts with its full logits.
 *
 * @module
 */
import type { Tensor } from "onnxruntime-node";
import { NUM_CANDIDATES } from "../model/sampling-head.ts";
import { GREEDY_EPS, type SampledToken, type SamplingRow } from "./sampler.ts";
import type { SamplingParams } from "./types.ts";

/** The device's sampling outputs for a step: [S] per row, [S, K] per candidate. */
export interface DeviceSamplingOutputs {
  argmax: BigInt64Array;
  candIds: BigInt64Array;
  candLogits: Float32Array;
  candProbs: Float32Array;
  lse: Float32Array;
  keptMass: Float32Array;
  draw: BigInt64Array;
  drawLogit: Float32Array;
  /** Candidates per row. */
  k: number;
  vocabSize: number;
}

/** The sampling head's outputs (a run's result, by output name) and the model's argmax, as typed arrays. */
export function deviceOutputs(
  head: Record<string, Tensor>,
  argmax: BigInt64Array,
  vocabSize: number,
): DeviceSamplingOutputs {
  return {
    argmax,
    candIds: head.cand_ids.data as BigInt64Array,
    candLogits: head.cand_logits.data as Float32Array,
    candProbs: head.cand_probs.data as Float32Array,
    lse: head.lse.data as Float32Array,
    keptMass: head.kept_mass.data as Float32Array,
    draw: head.draw.data as BigInt64Array,
    drawLogit: head.draw_logit.data as Float32Array,
    k: Math.min(NUM_CANDIDATES, vocabSize),
    vocabSize,
  };
}

/** Greedy with nothing that edits or reports the logits: the argmax is the whole answer. */
export function isPlainGreedy(r: SamplingRow): boolean {
  return r.params.temperature < GREEDY_EPS && !wantsLogprobs(r.params) && !editsLogits(r);
}

/** A grammar's mask, logit_bias and penalties change logits the device never saw: such rows go to the host. */
export function editsLogits(r: SamplingRow): boolean {
  const p = r.params;
  return (
    r.allowedTokens !== undefined ||
    Object.keys(p.logitBias).length > 0 ||
    p.repetitionPenalty !== 1 ||
    p.presencePenalty !== 0 ||
    p.frequencyPenalty !== 0
  );
}

function wantsLogprobs(p: SamplingParams): boolean {
  return p.logprobs || p.topLogprobs > 0;
}

/**
 * Row `i`'s token from the device outputs, with the row's uniform draw `u`; null when only the full logits can
 * settle it (the caller then samples the row on the host with the same `u`).
 */
export function sampleFromDevice(
  r: SamplingRow,
  u: number,
  out: DeviceSamplingOutputs,
  i: number,
): SampledToken | null {
  if (editsLogits(r)) return null;
  const p = r.params;
  const { k, vocabSize: V } = out;
  const ids = out.candIds.subarray(i * k, (i + 1) * k);
  const logits = out.candLogits.subarray(i * k, (i + 1) * k);
  const probs = out.candProbs.subarray(i * k, (i + 1) * k);
  let tokenId: number;
  let logit: number;
  if (p.temperature < GREEDY_EPS) {
    tokenId = Number(out.argmax[i]);
    logit = logits[0];
  } else {
    const m = logits[0];
    // min_p and top_k as a threshold over the candidates (sorted best first), as sampler.ts applies them
    let thr = p.minP > 0 ? m + p.temperature * Math.log(p.minP) : Number.NEGATIVE_INFINITY;
    const topK = p.topK > 0 && p.topK < V;
    if (topK) {
      if (p.topK > k) return null;
      const kth = logits[p.topK - 1];
      if (k < V && logits[k - 1] >= kth) return null; // ties with the k-th may go on past the candidates
      thr = Math.max(thr, kth);
    }
    if (!topK && p.topP >= 1) {
      // the whole vocabulary (within min_p) in play: the device drew from it
      tokenId = Number(out.draw[i]);
      if (tokenId >= V) return null;
      logit = out.drawLogit[i];
    } else {
      let n = 0; // kept candidates: a prefix of the sorted list
      while (n < k && logits[n] >= thr) n++;
      // mass the draw is over: with top_k every kept token is a candidate; otherwise the device summed it
      let total = 0;
      for (let j = 0; j < n; j++) total += probs[j];
      if (!topK) total = out.keptMass[i];
      // vLLM's top_p: keep the shortest best-first prefix whose mass reaches top_p of the total
      let c = n;
      if (p.topP < 1) {
        let acc = 0;
        c = 0;
        while (c < n && acc < p.topP * total) acc += probs[c++];
        if (acc < p.topP * total) return null; // the nucleus reaches past the candidates
      }
      const nucleus = Array.from({ length: c }, (_, j) => j).sort((a, b) => Number(ids[a] - ids[b]));
      let mass = 0;
      for (const j of nucleus) mass += probs[j];
      // one inverse-CDF draw over the kept tokens in id order
      const target = u * mass;
      let acc = 0;
      let pick = nucleus[nucleus.length - 1];
      for (const j of nucleus) {
        acc += probs[j];
        if (acc > target) {
          pick = j;
          break;
        }
      }
      tokenId = Number(ids[pick]);
      logit = logits[pick];
    }
  }
  if (!wantsLogprobs(p)) return { tokenId };
  const lse = out.lse[i];
  const t: SampledToken = { tokenId, logprob: logit - lse };
  if (p.topLogprobs > 0) {
    t.topLogprobs = Array.from({ length: Math.min(p.topLogprobs, k) }, (_, j) => ({
      tokenId: Number(ids[j]),
      logprob: logits[j] - lse,
    }));
  }
  return t;
}
