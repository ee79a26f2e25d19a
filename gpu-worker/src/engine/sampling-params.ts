/**
 * Sampling-parameter validation: defaults and vLLM's ranges, checked at runtime because parameters arrive from
 * untrusted clients over NATS. Bounds also keep every value computable in float32 (see the limits below).
 *
 * @module
 */

import type { SamplingParams } from "./types.ts";

/** A sampling parameter out of range; `param` is its API (snake_case) name, and the message names it too. */
export class SamplingParamError extends Error {
  override name = "SamplingParamError";
  constructor(
    readonly param: string,
    message: string,
  ) {
    super(message);
  }
}

const MAX_STOP_STRINGS = 16;
/** Longer stop strings would make the stop checker hold back that much text on every token. */
const MAX_STOP_LENGTH = 1024;
const MAX_TOP_LOGPROBS = 20;
/** OpenAI's API allows 0..2; vLLM any value >= 0. Beyond this every token is equally likely anyway. */
const MAX_TEMPERATURE = 100;
/**
 * repetition_penalty divides positive logits and multiplies negative ones. vLLM only asks for > 0, but 1e-320
 * divides a logit into +Infinity in float32, which poisoned the whole step's sampling. Within [1/100, 100] every
 * penalised logit stays finite.
 */
const MIN_REPETITION_PENALTY = 0.01;
const MAX_REPETITION_PENALTY = 100;
/** OpenAI's limit on logit_bias entries (each one edits a logit per step). */
const MAX_LOGIT_BIAS_ENTRIES = 300;
const MAX_STOP_TOKEN_IDS = 1024;

/** A number field: null/undefined give the default, anything else must be a finite number. */
function num(raw: Record<string, unknown>, key: string, param: string, dflt: number): number {
  const v = raw[key];
  if (v === undefined || v === null) return dflt;
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw new SamplingParamError(param, `${param} must be a finite number, got ${JSON.stringify(v)}`);
  }
  return v;
}

function bool(raw: Record<string, unknown>, key: string, param: string): boolean {
  const v = raw[key];
  if (v === undefined || v === null) return false;
  if (typeof v !== "boolean")
    throw new SamplingParamError(param, `${param} must be a boolean, got ${JSON.stringify(v)}`);
  return v;
}

function check(ok: boolean, param: string, message: string): void {
  if (!ok) throw new SamplingParamError(param, message);
}

function tokenIds(raw: Record<string, unknown>, key: string, param: string, vocabSize: number): number[] {
  const v = raw[key];
  if (v === undefined || v === null) return [];
  check(Array.isArray(v), param, `${param} must be a list of token ids`);
  const ids = v as unknown[];
  check(
    ids.length <= MAX_STOP_TOKEN_IDS,
    param,
    `${param} allows at most ${MAX_STOP_TOKEN_IDS} ids, got ${ids.length}`,
  );
  for (const id of ids) {
    check(
      Number.isInteger(id) && (id as number) >= 0 && (id as number) < vocabSize,
      param,
      `${param}: ${JSON.stringify(id)} is not a token id in [0, ${vocabSize})`,
    );
  }
  return [...(ids as number[])];
}

/**
 * Applies defaults to a request's sampling parameters and rejects invalid ones (vLLM's ranges). The input may
 * come from an untrusted client, so types are checked at runtime; null counts as "not given".
 * top_k -1 is normalised to 0 (both mean "off").
 *
 * @throws SamplingParamError naming the parameter as the OpenAI/vLLM API spells it.
 * @example
 * validateSamplingParams({ temperature: 0.7, topP: 0.9 }, { vocabSize: 32000 }).topK; // 0
 */
export function validateSamplingParams(p: Partial<SamplingParams>, ctx: { vocabSize: number }): SamplingParams {
  const raw = p as Record<string, unknown>;

  const temperature = num(raw, "temperature", "temperature", 1);
  check(
    temperature >= 0 && temperature <= MAX_TEMPERATURE,
    "temperature",
    `temperature must be in [0, ${MAX_TEMPERATURE}], got ${temperature}`,
  );
  const topP = num(raw, "topP", "top_p", 1);
  check(topP > 0 && topP <= 1, "top_p", `top_p must be in (0, 1], got ${topP}`);
  const topK = num(raw, "topK", "top_k", 0);
  check(
    Number.isInteger(topK) && topK >= -1,
    "top_k",
    `top_k must be -1 or 0 (disabled) or an integer >= 1, got ${topK}`,
  );
  const minP = num(raw, "minP", "min_p", 0);
  check(minP >= 0 && minP <= 1, "min_p", `min_p must be in [0, 1], got ${minP}`);
  const repetitionPenalty = num(raw, "repetitionPenalty", "repetition_penalty", 1);
  check(
    repetitionPenalty >= MIN_REPETITION_PENALTY && repetitionPenalty <= MAX_REPETITION_PENALTY,
    "repetition_penalty",
    `repetition_penalty must be in [${MIN_REPETITION_PENALTY}, ${MAX_REPETITION_PENALTY}], got ${repetitionPenalty}`,
  );
  const presencePenalty = num(raw, "presencePenalty", "presence_penalty", 0);
  check(
    Math.abs(presencePenalty) <= 2,
    "presence_penalty",
    `presence_penalty must be in [-2, 2], got ${presencePenalty}`,
  );
  const frequencyPenalty = num(raw, "frequencyPenalty", "frequency_penalty", 0);
  check(
    Math.abs(frequencyPenalty) <= 2,
    "frequency_penalty",
    `frequency_penalty must be in [-2, 2], got ${frequencyPenalty}`,
  );

  const logitBias: Record<number, number> = {};
  const bias = raw["logitBias"];
  if (bias !== undefined && bias !== null) {
    check(
      typeof bias === "object" && !Array.isArray(bias),
      "logit_bias",
      "logit_bias must be a map of token id to bias",
    );
    const entries = Object.entries(bias as Record<string, unknown>);
    check(
      entries.length <= MAX_LOGIT_BIAS_ENTRIES,
      "logit_bias",
      `logit_bias allows at most ${MAX_LOGIT_BIAS_ENTRIES} entries, got ${entries.length}`,
    );
    for (const [key, value] of entries) {
      const id = Number(key);
      check(
        key.trim() !== "" && Number.isInteger(id) && id >= 0 && id < ctx.vocabSize,
        "logit_bias",
        `logit_bias: ${JSON.stringify(key)} is not a token id in [0, ${ctx.vocabSize})`,
      );
      check(
        typeof value === "number" && value >= -100 && value <= 100,
        "logit_bias",
        `logit_bias for token ${key} must be in [-100, 100], got ${JSON.stringify(value)}`,
      );
      logitBias[id] = value as number;
    }
  }

  const seedRaw = raw["seed"];
  check(
    seedRaw === undefined || seedRaw === null || Number.isSafeInteger(seedRaw),
    "seed",
    `seed must be an integer, got ${JSON.stringify(seedRaw)}`,
  );
  const seed = (seedRaw as number | null | undefined) ?? null;

  const maxRaw = raw["maxTokens"];
  check(
    maxRaw === undefined || maxRaw === null || (Number.isSafeInteger(maxRaw) && (maxRaw as number) >= 1),
    "max_tokens",
    `max_tokens must be an integer >= 1, got ${JSON.stringify(maxRaw)}`,
  );
  const maxTokens = (maxRaw as number | null | undefined) ?? null;

  const stopRaw = raw["stop"] ?? [];
  check(
    Array.isArray(stopRaw) && stopRaw.every((s) => typeof s === "string" && s.length > 0),
    "stop",
    "stop must be a list of non-empty strings",
  );
  const stop = [...(stopRaw as string[])];
  check(stop.length <= MAX_STOP_STRINGS, "stop", `stop allows at most ${MAX_STOP_STRINGS} strings, got ${stop.length}`);
  check(
    stop.every((s) => s.length <= MAX_STOP_LENGTH),
    "stop",
    `stop strings must be at most ${MAX_STOP_LENGTH} characters long`,
  );

  const logprobs = bool(raw, "logprobs", "logprobs");
  const topLogprobs = num(raw, "topLogprobs", "top_logprobs", 0);
  check(
    Number.isInteger(topLogprobs) && topLogprobs >= 0 && topLogprobs <= MAX_TOP_LOGPROBS,
    "top_logprobs",
    `top_logprobs must be an integer in [0, ${MAX_TOP_LOGPROBS}], got ${topLogprobs}`,
  );
  check(topLogprobs === 0 || logprobs, "top_logprobs", "top_logprobs requires logprobs to be true");

  return {
    temperature,
    topP,
    topK: topK === -1 ? 0 : topK,
    minP,
    repetitionPenalty,
    presencePenalty,
    frequencyPenalty,
    logitBias,
    seed,
    maxTokens,
    stop,
    stopTokenIds: tokenIds(raw, "stopTokenIds", "stop_token_ids", ctx.vocabSize),
    ignoreEos: bool(raw, "ignoreEos", "ignore_eos"),
    logprobs,
    topLogprobs,
  };
}
