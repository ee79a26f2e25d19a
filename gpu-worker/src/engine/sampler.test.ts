import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { type SampledToken, type SamplingFailure, type SamplingRow, sampleBatch } from "./sampler.ts";
import { validateSamplingParams } from "./sampling-params.ts";
import { SeededRng } from "./seeded-rng.ts";
import type { SamplingParams } from "./types.ts";

/** Always draws `u`, so a test can place the draw in the kept distribution's CDF exactly. */
class FixedRng extends SeededRng {
  draws = 0;
  constructor(private readonly u: number) {
    super(0);
  }
  override next(): number {
    this.draws++;
    return this.u;
  }
}

const params = (p: Partial<SamplingParams> = {}, vocabSize = 1000) => validateSamplingParams(p, { vocabSize });

function row(p: Partial<SamplingParams>, rng: SeededRng | null, extra: Partial<SamplingRow> = {}): SamplingRow {
  return { params: params(p), rng, promptTokenIds: [], outputTokenIds: [], ...extra };
}

/** The row's token; fails the test if the row could not be sampled. */
function ok(t: SampledToken | SamplingFailure): SampledToken {
  if (t.error !== undefined) throw new Error(`row failed: ${t.error}`);
  return t;
}

/** Samples one row from logits given as plain numbers. */
function sample1(
  logits: number[],
  p: Partial<SamplingParams>,
  u = 0.5,
  extra: Partial<SamplingRow> = {},
): SampledToken {
  return ok(sampleBatch(Float32Array.from(logits), logits.length, [row(p, new FixedRng(u), extra)])[0]);
}

/** Logits whose softmax at temperature 1 is `probs`. */
const fromProbs = (probs: number[]) => probs.map(Math.log);

describe("sampleBatch", () => {
  it("greedy picks the argmax, the lowest id on ties, and still advances the generator once", () => {
    const rng = new FixedRng(0.99);
    const logits = Float32Array.from([1, 5, 3, 5, -2, 0, 5, 2]);
    const [a, b] = sampleBatch(logits, 4, [row({ temperature: 0 }, rng), row({ temperature: 0 }, null)]);
    expect([a.tokenId, b.tokenId]).toEqual([1, 2]);
    expect(rng.draws).toBe(1);
  });

  it("samples by inverse CDF in token-id order at temperature 1", () => {
    const logits = fromProbs([0.2, 0.5, 0.3]);
    expect(sample1(logits, {}, 0.19).tokenId).toBe(0);
    expect(sample1(logits, {}, 0.21).tokenId).toBe(1);
    expect(sample1(logits, {}, 0.69).tokenId).toBe(1);
    expect(sample1(logits, {}, 0.71).tokenId).toBe(2);
    expect(sample1(logits, {}, 0.999999).tokenId).toBe(2);
  });

  it("temperature sharpens and flattens the distribution", () => {
    const logits = fromProbs([0.25, 0.75]);
    // T = 0.5 squares the odds: 1:9 ; T = 2 takes their root: 1:sqrt(3).
    expect(sample1(logits, { temperature: 0.5 }, 0.09).tokenId).toBe(0);
    expect(sample1(logits, { temperature: 0.5 }, 0.11).tokenId).toBe(1);
    const p0 = 1 / (1 + Math.sqrt(3));
    expect(sample1(logits, { temperature: 2 }, p0 - 0.01).tokenId).toBe(0);
    expect(sample1(logits, { temperature: 2 }, p0 + 0.01).tokenId).toBe(1);
  });

  it("min_p drops tokens below min_p times the top probability", () => {
    const logits = fromProbs([0.05, 0.5, 0.3, 0.15]);
    expect(sample1(logits, {}, 0).tokenId).toBe(0);
    expect(sample1(logits, { minP: 0.2 }, 0).tokenId).toBe(1); // 0.05 < 0.1
    expect(sample1(logits, { minP: 0.2 }, 0.999).tokenId).toBe(3); // 0.15 >= 0.1
    expect(sample1(logits, { minP: 0.4 }, 0.999).tokenId).toBe(2); // 0.15 < 0.2 <= 0.3
    expect(sample1(logits, { minP: 1 }, 0.999).tokenId).toBe(1);
  });

  it("top_k keeps the k most likely tokens, renormalised", () => {
    const logits = fromProbs([0.1, 0.4, 0.2, 0.3]);
    // Kept {1: 0.4, 3: 0.3} -> CDF 4/7 at token 1.
    expect(sample1(logits, { topK: 2 }, 0).tokenId).toBe(1);
    expect(sample1(logits, { topK: 2 }, 4 / 7 - 0.01).tokenId).toBe(1);
    expect(sample1(logits, { topK: 2 }, 4 / 7 + 0.01).tokenId).toBe(3);
    expect(sample1(logits, { topK: 1 }, 0.999).tokenId).toBe(1);
    expect(sample1(logits, { topK: 4 }, 0).tokenId).toBe(0);
  });

  it("top_k keeps every token tied with the k-th", () => {
    const logits = [1, 3, 2, 2, 0];
    expect(sample1(logits, { topK: 2 }, 0.999).tokenId).toBe(3);
  });

  it("top_p keeps the smallest top set whose mass reaches top_p (vLLM's rule)", () => {
    const logits = fromProbs([0.1, 0.4, 0.2, 0.3]);
    // Budget 0.25 to drop: token 0 (0.1) goes, token 2 (cum 0.3) stays.
    expect(sample1(logits, { topP: 0.75 }, 0).tokenId).toBe(1);
    expect(sample1(logits, { topP: 0.75 }, 0.999).tokenId).toBe(3);
    // Budget 0.4: tokens 0 and 2 go; kept {1, 3} renormalised.
    expect(sample1(logits, { topP: 0.6 }, 4 / 7 - 0.01).tokenId).toBe(1);
    expect(sample1(logits, { topP: 0.6 }, 4 / 7 + 0.01).tokenId).toBe(3);
    // A tiny top_p still keeps the most likely token.
    expect(sample1(logits, { topP: 1e-9 }, 0.999).tokenId).toBe(1);
  });

  it("top_p breaks ties between equal logits by keeping the lower id", () => {
    // p = [0.475, 0.175, 0.175, 0.175]; top_p 0.7 may drop 0.3 of the mass: one of the three equal tokens goes,
    // the highest id. Kept {0, 1, 2}, CDF 0.576 at token 0, 0.788 at token 1.
    const logits = [1, 0, 0, 0];
    expect(sample1(logits, { topP: 0.7 }, 0.78).tokenId).toBe(1);
    expect(sample1(logits, { topP: 0.7 }, 0.8).tokenId).toBe(2);
    expect(sample1(logits, { topP: 0.7 }, 0.999).tokenId).toBe(2);
  });

  it("applies the filters together: min_p, then top_k, then top_p", () => {
    const logits = fromProbs([0.02, 0.3, 0.08, 0.25, 0.2, 0.15]);
    // min_p 0.1 drops token 0 (0.02 < 0.03); top_k 4 drops token 2; top_p 0.6 of the remaining 0.9 may drop
    // 0.36: tokens 5 (0.15) and 4 (cum 0.35) go. Kept {1: 0.3, 3: 0.25}, CDF 0.3/0.55 at token 1.
    const p = { minP: 0.1, topK: 4, topP: 0.6 };
    expect(sample1(logits, p, 0).tokenId).toBe(1);
    expect(sample1(logits, p, 0.3 / 0.55 - 0.01).tokenId).toBe(1);
    expect(sample1(logits, p, 0.3 / 0.55 + 0.01).tokenId).toBe(3);
    expect(sample1(logits, p, 0.999).tokenId).toBe(3);
  });

  it("logit_bias is added before sampling", () => {
    expect(sample1([0, 0, 0], { temperature: 0, logitBias: { 2: 5 } }).tokenId).toBe(2);
    expect(sample1([3, 0, 0], { temperature: 0, logitBias: { 0: -100 } }).tokenId).toBe(1);
  });

  it("repetition_penalty divides positive and multiplies negative logits of prompt and output tokens", () => {
    // Token 0's logit 2 becomes 1 with penalty 2.
    expect(sample1([2, 0.99], { temperature: 0, repetitionPenalty: 2 }, 0, { promptTokenIds: [0] }).tokenId).toBe(0);
    expect(sample1([2, 1.01], { temperature: 0, repetitionPenalty: 2 }, 0, { promptTokenIds: [0] }).tokenId).toBe(1);
    expect(sample1([2, 1.01], { temperature: 0, repetitionPenalty: 2 }, 0, { outputTokenIds: [0] }).tokenId).toBe(1);
    // Negative: -1 becomes -2 (once, however often the token occurs).
    expect(sample1([-1, -1.99], { temperature: 0, repetitionPenalty: 2 }, 0, { promptTokenIds: [0, 0] }).tokenId).toBe(
      1,
    );
    expect(sample1([-1, -2.01], { temperature: 0, repetitionPenalty: 2 }, 0, { promptTokenIds: [0, 0] }).tokenId).toBe(
      0,
    );
    expect(sample1([-1, -1.5], { temperature: 0 }, 0, { promptTokenIds: [0] }).tokenId).toBe(0);
  });

  it("frequency and presence penalties count output tokens only", () => {
    const out = { outputTokenIds: [0, 0, 0], promptTokenIds: [0, 0, 0, 0, 0] };
    // frequency 0.5 * 3 = 1.5: logit 3 -> 1.5
    expect(sample1([3, 1.49], { temperature: 0, frequencyPenalty: 0.5 }, 0, out).tokenId).toBe(0);
    expect(sample1([3, 1.51], { temperature: 0, frequencyPenalty: 0.5 }, 0, out).tokenId).toBe(1);
    // presence 1.5 once, however often the token occurred
    expect(sample1([3, 1.49], { temperature: 0, presencePenalty: 1.5 }, 0, out).tokenId).toBe(0);
    expect(sample1([3, 1.51], { temperature: 0, presencePenalty: 1.5 }, 0, out).tokenId).toBe(1);
    // both, and nothing for prompt-only tokens
    expect(sample1([3, 0.49], { temperature: 0, presencePenalty: 1, frequencyPenalty: 0.5 }, 0, out).tokenId).toBe(0);
    expect(sample1([3, 0.51], { temperature: 0, presencePenalty: 1, frequencyPenalty: 0.5 }, 0, out).tokenId).toBe(1);
    const promptOnly = { promptTokenIds: [0] };
    expect(sample1([3, 2], { temperature: 0, presencePenalty: 2, frequencyPenalty: 2 }, 0, promptOnly).tokenId).toBe(0);
  });

  it("returns raw-logit logprobs and top logprobs, whatever the processing", () => {
    const logits = [1, 2, 3, 3];
    const lse = Math.log(logits.reduce((a, x) => a + Math.exp(x), 0));
    const t = sample1(logits, { temperature: 0, logitBias: { 0: 10 }, logprobs: true, topLogprobs: 3 });
    expect(t.tokenId).toBe(0);
    expect(t.logprob).toBeCloseTo(1 - lse, 6);
    expect(t.topLogprobs!.map((x) => x.tokenId)).toEqual([2, 3, 1]);
    expect(t.topLogprobs![0].logprob).toBeCloseTo(3 - lse, 6);
    expect(t.topLogprobs![2].logprob).toBeCloseTo(2 - lse, 6);
    const plain = sample1(logits, { temperature: 0.7, topK: 2, logprobs: true });
    expect(plain.logprob).toBeCloseTo(logits[plain.tokenId] - lse, 6);
    expect(plain.topLogprobs).toBeUndefined();
    expect(sample1(logits, {}).logprob).toBeUndefined();
  });

  it("leaves the caller's logits unchanged", () => {
    const logits = Float32Array.from([1, 2, 3, 4, 5, 6]);
    const copy = Float32Array.from(logits);
    sampleBatch(logits, 3, [
      row({ logitBias: { 0: 3 }, repetitionPenalty: 1.3, frequencyPenalty: 1 }, new SeededRng(1), {
        promptTokenIds: [1, 2],
        outputTokenIds: [2, 2, 0],
      }),
      row({ temperature: 0, presencePenalty: -2 }, null, { outputTokenIds: [0] }),
    ]);
    expect(logits).toEqual(copy);
  });

  it("a seeded request's tokens do not depend on the rest of the batch or its order", () => {
    const V = 50;
    const requests = [
      { seed: 1, p: { temperature: 0.9, topP: 0.8 } },
      { seed: 2, p: { temperature: 1.2, topK: 10, minP: 0.01 } },
      { seed: 3, p: { temperature: 0.5, repetitionPenalty: 1.2, presencePenalty: 0.3 } },
      { seed: 1, p: { temperature: 1 } },
    ];
    // The logits a request sees at a step depend only on (request, step).
    const logitsFor = (r: number, step: number) => {
      const g = new SeededRng(1000 * r + step);
      return Array.from({ length: V }, () => 4 * g.next());
    };
    const generate = (order: number[], steps: number) => {
      const rngs = requests.map((r) => new SeededRng(r.seed));
      const outputs = requests.map(() => [] as number[]);
      for (let step = 0; step < steps; step++) {
        const batch = step % 2 === 0 ? order : order.slice(0, Math.max(1, order.length - 1)); // vary composition
        const logits = Float32Array.from(batch.flatMap((r) => logitsFor(r, outputs[r].length)));
        const rows = batch.map((r) => ({
          params: params(requests[r].p, V),
          rng: rngs[r],
          promptTokenIds: [1, 2, 3],
          outputTokenIds: outputs[r],
        }));
        for (const [i, t] of sampleBatch(logits, V, rows).entries()) outputs[batch[i]].push(t.tokenId);
      }
      return outputs;
    };
    const a = generate([0, 1, 2, 3], 12);
    const b = generate([3, 2, 1, 0], 12);
    const c = generate([1, 0], 12);
    for (const r of [0, 1]) {
      const n = Math.min(a[r].length, b[r].length, c[r].length);
      expect(a[r].slice(0, n)).toEqual(b[r].slice(0, n));
      expect(a[r].slice(0, n)).toEqual(c[r].slice(0, n));
      expect(n).toBeGreaterThan(5);
    }
    expect(a[2].slice(0, 6)).toEqual(b[2].slice(0, 6));
  });

  it("large vocabularies: the heap and quickselect top_k paths agree with a sort", () => {
    const V = 40000;
    const g = new SeededRng(5);
    const logits = Float32Array.from({ length: V }, () => Math.round(g.next() * 2000) / 100);
    const sortedDesc = [...logits].sort((a, b) => b - a);
    for (const k of [7, 1500]) {
      const kth = sortedDesc[k - 1];
      for (let i = 0; i < 20; i++) {
        const [t] = sampleBatch(logits, V, [row({ topK: k }, new SeededRng(i))]);
        expect(logits[t.tokenId]).toBeGreaterThanOrEqual(kth);
      }
      // The least likely kept token is reachable: u near 1 lands on the highest kept id.
      const [last] = sampleBatch(logits, V, [row({ topK: k, temperature: 100 }, new FixedRng(0.9999999))]);
      const keptIds = [...logits.keys()].filter((j) => logits[j] >= kth);
      expect(last.tokenId).toBeGreaterThanOrEqual(keptIds[keptIds.length - 5]);
    }
  });

  it("top logprobs over a large vocabulary match a full sort", () => {
    const V = 30000;
    const g = new SeededRng(9);
    const logits = Float32Array.from({ length: V }, () => Math.round(g.next() * 500) / 50); // many ties
    const lse = Math.log(logits.reduce((a, x) => a + Math.exp(x), 0));
    const t = ok(sampleBatch(logits, V, [row({ logprobs: true, topLogprobs: 20 }, new SeededRng(1))])[0]);
    const want = [...logits.keys()].sort((a, b) => logits[b] - logits[a] || a - b).slice(0, 20);
    expect(t.topLogprobs!.map((x) => x.tokenId)).toEqual(want);
    for (const x of t.topLogprobs!) expect(x.logprob).toBeCloseTo(logits[x.tokenId] - lse, 9);
    expect(t.logprob).toBeCloseTo(logits[t.tokenId] - lse, 9);
  });

  it("matches a sort-based reference of vLLM's filters (property)", () => {
    fc.assert(
      fc.property(
        fc
          .integer({ min: 1, max: 40 })
          .chain((spread) => fc.array(fc.integer({ min: -spread, max: spread }), { minLength: 1, maxLength: 60 })),
        // Coarse steps give ties (also at the top_p edge); fine ones put tokens in neighbouring histogram bins.
        fc.constantFrom(8, 300),
        fc.record({
          temperature: fc.constantFrom(0.3, 0.7, 1, 1.5),
          topK: fc.constantFrom(0, 1, 3, 10),
          topP: fc.constantFrom(1, 0.95, 0.8, 0.5, 0.1),
          minP: fc.constantFrom(0, 0.05, 0.3),
        }),
        fc.double({ min: 0, max: 0.999999, noNaN: true }),
        (ints, step, p, u) => {
          const logits = ints.map((x) => x / step);
          const want = referenceSample(logits, p, u);
          if (want === null) return; // u within 1e-9 of a CDF step: either answer is right
          expect(sample1(logits, p, u).tokenId).toBe(want);
        },
      ),
      { numRuns: 400 },
    );
  });
});

/**
 * Straightforward vLLM order on float64 probabilities with full sorts: min_p, top_k, top_p, then inverse CDF in
 * id order. Returns null when u lands too close to a step of the CDF for rounding to be ruled out.
 */
function referenceSample(
  logits: number[],
  p: { temperature: number; topK: number; topP: number; minP: number },
  u: number,
): number | null {
  const m = Math.max(...logits);
  const w = logits.map((x) => Math.exp((x - m) / p.temperature));
  let keep = logits.map(() => true);
  if (p.minP > 0) keep = keep.map((k, j) => k && w[j] >= p.minP);
  if (p.topK > 0 && p.topK < logits.length) {
    const kth = [...logits].sort((a, b) => b - a)[p.topK - 1];
    keep = keep.map((k, j) => k && logits[j] >= kth);
  }
  if (p.topP < 1) {
    const ids = logits.map((_, j) => j).filter((j) => keep[j]);
    const total = ids.reduce((a, j) => a + w[j], 0);
    // Ascending likelihood, higher id first on ties; drop while the cumulative mass stays <= (1 - top_p).
    ids.sort((a, b) => logits[a] - logits[b] || b - a);
    let cum = 0;
    for (let i = 0; i < ids.length - 1; i++) {
      cum += w[ids[i]];
      if (Math.abs(cum - (1 - p.topP) * total) < 1e-9 * total) return null;
      if (cum > (1 - p.topP) * total) break;
      keep[ids[i]] = false;
    }
  }
  const kept = logits.map((_, j) => j).filter((j) => keep[j]);
  const mass = kept.reduce((a, j) => a + w[j], 0);
  let acc = 0;
  for (const j of kept) {
    acc += w[j];
    if (Math.abs(acc - u * mass) < 1e-9 * mass) return null;
    if (acc > u * mass) return j;
  }
  return kept[kept.length - 1];
}

describe("one row's failure stays in that row", () => {
  const V = 64;
  const base = (seed: number) => Float32Array.from({ length: V }, (_, j) => Math.sin(j * 0.7 + seed) * 4);
  const params4: Partial<SamplingParams>[] = [
    { temperature: 0 },
    { temperature: 0.8, seed: 3 },
    { temperature: 1, topP: 0.9, seed: 4 },
    { temperature: 0.7, topK: 5, minP: 0.05, repetitionPenalty: 1.3, seed: 5 },
  ];
  const rowsFor = () => params4.map((p, i) => row(p, new SeededRng(i + 10), { promptTokenIds: [1, 2, 3] }));
  const alone = params4.map((_, i) => ok(sampleBatch(base(i), V, [rowsFor()[i]])[0]).tokenId);

  it.each([
    ["NaN", Number.NaN],
    ["+Infinity", Number.POSITIVE_INFINITY],
    ["-Infinity", Number.NEGATIVE_INFINITY],
  ])("a %s in one row fails that row only; the others sample as they would alone", (_, bad) => {
    for (let victim = 0; victim < params4.length; victim++) {
      const logits = new Float32Array(V * params4.length);
      for (let i = 0; i < params4.length; i++) logits.set(base(i), i * V);
      logits[victim * V + 17] = bad;
      const rowSums = Float32Array.from(params4, (_, i) => logits.subarray(i * V, (i + 1) * V).reduce((a, b) => a + b));
      const out = sampleBatch(logits, V, rowsFor(), { rowSums });
      out.forEach((t, i) => {
        if (i === victim) expect(t.error).toMatch(/non-finite logits/);
        else expect(ok(t).tokenId).toBe(alone[i]);
      });
    }
  });

  it("without the model's row sums, a row with infinities still fails alone rather than yielding a bad token", () => {
    const logits = new Float32Array(2 * V);
    logits.set(base(0), 0);
    logits.set(base(1), V);
    logits.fill(Number.POSITIVE_INFINITY, 0, 3);
    const [bad, good] = sampleBatch(logits, V, [row({ temperature: 1, seed: 1 }, new SeededRng(1)), rowsFor()[1]]);
    expect(bad.error).toBeDefined();
    expect(ok(good).tokenId).toBe(alone[1]);
  });
});

describe("sampling from the model's probabilities", () => {
  const V = 1000;
  const logits = Float32Array.from({ length: V }, (_, j) => Math.sin(j * 12.9898) * 6);
  const softmax = (t: number) => {
    const m = Math.max(...logits);
    const e = Array.from(logits, (x) => Math.exp((x - m) / t));
    const z = e.reduce((a, b) => a + b, 0);
    return Float32Array.from(e, (x) => x / z);
  };
  const draw = (params: Partial<SamplingParams>, probs?: Float32Array) =>
    Array.from({ length: 200 }, (_, seed) => {
      const row = {
        params: validateSamplingParams(params, { vocabSize: V }),
        rng: new SeededRng(seed),
        promptTokenIds: [1],
        outputTokenIds: [],
      };
      return sampleBatch(logits, V, [row], { probs })[0].tokenId;
    });

  it("draws the same tokens as the logits path for the same seeds", () => {
    expect(draw({ temperature: 0.7 }, softmax(0.7))).toEqual(draw({ temperature: 0.7 }));
    expect(draw({ temperature: 0.7, topP: 0.9 }, softmax(0.7))).toEqual(draw({ temperature: 0.7, topP: 0.9 }));
  });

  it("top_p over a flat distribution (too many candidates to sort) matches too", () => {
    const W = 32000;
    const flat = Float32Array.from({ length: W }, (_, j) => Math.sin(j * 7.31) * 0.5);
    const m = Math.max(...flat);
    const e = Array.from(flat, (x) => Math.exp(x - m));
    const z = e.reduce((a, b) => a + b, 0);
    const probs = Float32Array.from(e, (x) => x / z);
    const drawW = (pr?: Float32Array) =>
      Array.from({ length: 50 }, (_, seed) => {
        const r = {
          params: validateSamplingParams({ temperature: 1, topP: 0.9 }, { vocabSize: W }),
          rng: new SeededRng(seed),
          promptTokenIds: [1],
          outputTokenIds: [],
        };
        return sampleBatch(flat, W, [r], { probs: pr })[0].tokenId;
      });
    expect(drawW(probs)).toEqual(drawW());
  });

  it("ignores the probabilities when logit_bias or a penalty changed the logits", () => {
    const tokens = draw({ temperature: 0.7, logitBias: { 3: 100 } }, softmax(0.7));
    expect(new Set(tokens)).toEqual(new Set([3]));
  });
});

describe("greedy rows with the model's argmax", () => {
  const V = 8;
  const logits = Float32Array.from([0, 1, 5, 2, 5, 0, 0, 0]);
  const row = (params: Partial<SamplingParams>) => ({
    params: validateSamplingParams(params, { vocabSize: V }),
    rng: new SeededRng(1),
    promptTokenIds: [1],
    outputTokenIds: [],
  });
  it("takes the model's argmax when nothing edited the logits", () => {
    // a deliberately different argmax proves it is used, not recomputed
    expect(sampleBatch(logits, V, [row({ temperature: 0 })], { argmax: BigInt64Array.from([4n]) })[0].tokenId).toBe(4);
    expect(sampleBatch(logits, V, [row({ temperature: 0 })])[0].tokenId).toBe(2);
  });
  it("recomputes it after logit_bias changed the logits", () => {
    const biased = row({ temperature: 0, logitBias: { 7: 10 } });
    expect(sampleBatch(logits, V, [biased], { argmax: BigInt64Array.from([2n]) })[0].tokenId).toBe(7);
  });
});
