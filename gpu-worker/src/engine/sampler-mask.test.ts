// The grammar bitmask in the batched sampler: a disallowed token is never sampled, whatever the parameters, and a
// masked row never takes the model's precomputed argmax or probabilities.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { type SampledToken, type SamplingRow, sampleBatch } from "./sampler.ts";
import { validateSamplingParams } from "./sampling-params.ts";
import { SeededRng } from "./seeded-rng.ts";
import type { SamplingParams } from "./types.ts";

function bitmask(vocabSize: number, allowed: Iterable<number>): Int32Array {
  const mask = new Int32Array(Math.ceil(vocabSize / 32));
  for (const id of allowed) mask[id >> 5] |= 1 << (id & 31);
  return mask;
}

/** One row's token, failing the test on a sampling error. */
function only(results: ReturnType<typeof sampleBatch>): SampledToken {
  const [t] = results;
  if (t.error !== undefined) throw new Error(t.error);
  return t;
}

function row(p: Partial<SamplingParams>, vocabSize: number, extra: Partial<SamplingRow> = {}): SamplingRow {
  return {
    params: validateSamplingParams(p, { vocabSize }),
    rng: new SeededRng(7),
    promptTokenIds: [],
    outputTokenIds: [],
    ...extra,
  };
}

describe("sampleBatch with a grammar bitmask", () => {
  it("greedy takes the best allowed token, not the model's argmax", () => {
    const logits = Float32Array.from([0, 9, 1, 5, 3, 2]);
    const argmaxes = BigInt64Array.from([1n]);
    const allowedTokens = bitmask(6, [2, 4, 5]);
    const t = only(sampleBatch(logits, 6, [row({ temperature: 0 }, 6, { allowedTokens })], { argmax: argmaxes }));
    expect(t.tokenId).toBe(4);
    expect(Array.from(logits)).toEqual([0, 9, 1, 5, 3, 2]); // the caller's buffer is untouched
  });

  it("draws from the allowed tokens renormalised, ignoring the model's probabilities", () => {
    // Allowed: 1 and 3 with equal logits; token 0 holds almost all of the unmasked mass.
    const logits = Float32Array.from([20, 1, 1, 1]);
    const probs = Float32Array.from([0.97, 0.01, 0.01, 0.01]);
    const allowedTokens = bitmask(4, [1, 3]);
    const draw = (u: number) => {
      const rng = { next: () => u } as unknown as SeededRng;
      return only(sampleBatch(logits, 4, [{ ...row({ temperature: 1 }, 4, { allowedTokens }), rng }], { probs }))
        .tokenId;
    };
    expect(draw(0.1)).toBe(1);
    expect(draw(0.49)).toBe(1);
    expect(draw(0.51)).toBe(3);
    expect(draw(0.99)).toBe(3);
  });

  it("reports logprobs of the masked distribution", () => {
    const logits = Float32Array.from([3, 0, 0, 2, 9]);
    const allowedTokens = bitmask(5, [0, 3]);
    const t = only(
      sampleBatch(logits, 5, [row({ temperature: 0, logprobs: true, topLogprobs: 3 }, 5, { allowedTokens })]),
    );
    expect(t.tokenId).toBe(0);
    const top = t.topLogprobs!.filter((x) => Number.isFinite(x.logprob));
    expect(top.map((x) => x.tokenId)).toEqual([0, 3]);
    expect(top.reduce((s, x) => s + Math.exp(x.logprob), 0)).toBeCloseTo(1, 6);
  });

  it("fails the row whose bitmask allows nothing, and only that row", () => {
    const [bad, good] = sampleBatch(new Float32Array(80), 40, [
      row({}, 40, { allowedTokens: new Int32Array(2) }),
      row({}, 40, { allowedTokens: bitmask(40, [7]) }),
    ]);
    expect(bad.error).toMatch(/allows no token/);
    expect(good).toMatchObject({ tokenId: 7 });
  });

  it("never samples a disallowed token, whatever the parameters (property)", () => {
    const V = 200;
    fc.assert(
      fc.property(
        fc.array(fc.float({ min: -20, max: 20, noNaN: true }), { minLength: V, maxLength: V }),
        fc.uniqueArray(fc.integer({ min: 0, max: V - 1 }), { minLength: 1, maxLength: 12 }),
        fc.record({
          temperature: fc.constantFrom(0, 0.5, 1, 1.7),
          topP: fc.constantFrom(1, 0.9, 0.3),
          topK: fc.constantFrom(0, 1, 5, 50),
          minP: fc.constantFrom(0, 0.1),
          repetitionPenalty: fc.constantFrom(1, 1.3),
          presencePenalty: fc.constantFrom(0, 1),
          seed: fc.integer({ min: 0, max: 1000 }),
        }),
        fc.dictionary(fc.integer({ min: 0, max: V - 1 }).map(String), fc.constantFrom(-100, 5, 100), { maxKeys: 4 }),
        (values, allowed, p, bias) => {
          const logits = Float32Array.from(values);
          const r = row({ ...p, logitBias: bias }, V, {
            allowedTokens: bitmask(V, allowed),
            outputTokenIds: [allowed[0], 3, 4],
            rng: new SeededRng(p.seed),
          });
          const probs = new Float32Array(V).fill(1 / V);
          const t = only(sampleBatch(logits, V, [r], { probs, argmax: BigInt64Array.from([0n]) }));
          expect(allowed).toContain(t.tokenId);
        },
      ),
      { numRuns: 300 },
    );
  });
});
