import { describe, expect, it } from "vitest";
import { SamplingParamError, validateSamplingParams } from "./sampling-params.ts";
import type { SamplingParams } from "./types.ts";

describe("validateSamplingParams", () => {
  it("applies the defaults", () => {
    expect(validateSamplingParams({}, { vocabSize: 10 })).toEqual({
      temperature: 1,
      topP: 1,
      topK: 0,
      minP: 0,
      repetitionPenalty: 1,
      presencePenalty: 0,
      frequencyPenalty: 0,
      logitBias: {},
      seed: null,
      maxTokens: null,
      stop: [],
      stopTokenIds: [],
      ignoreEos: false,
      logprobs: false,
      topLogprobs: 0,
    });
  });

  it("keeps valid values, treats null as not given and normalises top_k -1 to 0", () => {
    const p = validateSamplingParams(
      {
        temperature: 0,
        topP: 0.5,
        topK: -1,
        minP: 1,
        seed: -7,
        maxTokens: 3,
        stop: ["a"],
        logitBias: { 9: -100 },
        logprobs: true,
        topLogprobs: 20,
        frequencyPenalty: null as unknown as number,
      },
      { vocabSize: 10 },
    );
    expect(p).toMatchObject({ temperature: 0, topP: 0.5, topK: 0, minP: 1, seed: -7, maxTokens: 3, stop: ["a"] });
    expect(p).toMatchObject({ logitBias: { 9: -100 }, logprobs: true, topLogprobs: 20, frequencyPenalty: 0 });
  });

  const bad: [Partial<SamplingParams> | Record<string, unknown>, string][] = [
    [{ temperature: -0.1 }, "temperature"],
    [{ temperature: Number.NaN }, "temperature"],
    [{ temperature: "1" }, "temperature"],
    [{ topP: 0 }, "top_p"],
    [{ topP: 1.01 }, "top_p"],
    [{ topK: -2 }, "top_k"],
    [{ topK: 1.5 }, "top_k"],
    [{ minP: -0.1 }, "min_p"],
    [{ minP: 1.1 }, "min_p"],
    [{ temperature: 101 }, "temperature"],
    [{ temperature: Number.POSITIVE_INFINITY }, "temperature"],
    [{ repetitionPenalty: 0 }, "repetition_penalty"],
    // tiny positive values once overflowed float32 when dividing a logit and failed the whole step
    [{ repetitionPenalty: 1e-320 }, "repetition_penalty"],
    [{ repetitionPenalty: 5e-324 }, "repetition_penalty"],
    [{ repetitionPenalty: 1e-300 }, "repetition_penalty"],
    [{ repetitionPenalty: 1e300 }, "repetition_penalty"],
    [{ repetitionPenalty: Number.NaN }, "repetition_penalty"],
    [{ presencePenalty: Number.NEGATIVE_INFINITY }, "presence_penalty"],
    [{ topP: Number.NaN }, "top_p"],
    [{ minP: Number.POSITIVE_INFINITY }, "min_p"],
    [{ logitBias: { 1: Number.NaN } }, "logit_bias"],
    [{ logitBias: { 1: Number.POSITIVE_INFINITY } }, "logit_bias"],
    [{ stop: ["x".repeat(1025)] }, "stop"],
    [{ stopTokenIds: Array.from({ length: 1025 }, () => 1) }, "stop_token_ids"],
    [{ presencePenalty: 2.5 }, "presence_penalty"],
    [{ frequencyPenalty: -2.5 }, "frequency_penalty"],
    [{ logitBias: { 10: 1 } }, "logit_bias"],
    [{ logitBias: { 1: 101 } }, "logit_bias"],
    [{ logitBias: { "-1": 1 } }, "logit_bias"],
    [{ logitBias: { x: 1 } }, "logit_bias"],
    [{ seed: 1.5 }, "seed"],
    [{ seed: 2 ** 60 }, "seed"],
    [{ maxTokens: 0 }, "max_tokens"],
    [{ maxTokens: 2.5 }, "max_tokens"],
    [{ stop: [""] }, "stop"],
    [{ stop: "x" }, "stop"],
    [{ stop: Array.from({ length: 17 }, (_, i) => `s${i}`) }, "stop"],
    [{ stopTokenIds: [10] }, "stop_token_ids"],
    [{ ignoreEos: 1 }, "ignore_eos"],
    [{ logprobs: "yes" }, "logprobs"],
    [{ logprobs: true, topLogprobs: 21 }, "top_logprobs"],
    [{ topLogprobs: 2 }, "top_logprobs"], // needs logprobs: true
  ];
  it.each(bad)("rejects %j naming %s", (p, name) => {
    let err: unknown;
    try {
      validateSamplingParams(p as Partial<SamplingParams>, { vocabSize: 10 });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SamplingParamError);
    expect((err as SamplingParamError).param).toBe(name);
    expect((err as SamplingParamError).message).toContain(name);
  });

  it("caps logit_bias at 300 entries", () => {
    const bias = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [i, 1]));
    expect(validateSamplingParams({ logitBias: bias(300) }, { vocabSize: 1000 }).logitBias[299]).toBe(1);
    expect(() => validateSamplingParams({ logitBias: bias(301) }, { vocabSize: 1000 })).toThrow(/at most 300 entries/);
  });
});
