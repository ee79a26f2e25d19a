/**
 * OpenAI/vLLM request parameters -> the protocol's sampling parameters (null and unset both mean "default").
 *
 * @module
 */
import type { SamplingParams } from "@llama-edge/shared";
import type { ChatCompletionRequest, CompletionRequest } from "../openai/schemas.ts";

type Common = Pick<
  ChatCompletionRequest & CompletionRequest,
  | "temperature"
  | "top_p"
  | "top_k"
  | "min_p"
  | "repetition_penalty"
  | "presence_penalty"
  | "frequency_penalty"
  | "logit_bias"
  | "seed"
  | "stop"
  | "stop_token_ids"
  | "ignore_eos"
>;

export function samplingParams(
  req: Common,
  maxTokens: number | null,
  logprobs: { logprobs: boolean; topLogprobs: number },
): SamplingParams {
  const s: SamplingParams = {};
  if (req.temperature != null) s.temperature = req.temperature;
  if (req.top_p != null) s.top_p = req.top_p;
  if (req.top_k != null) s.top_k = req.top_k;
  if (req.min_p != null) s.min_p = req.min_p;
  if (req.repetition_penalty != null) s.repetition_penalty = req.repetition_penalty;
  if (req.presence_penalty != null) s.presence_penalty = req.presence_penalty;
  if (req.frequency_penalty != null) s.frequency_penalty = req.frequency_penalty;
  if (req.logit_bias != null) s.logit_bias = req.logit_bias;
  if (req.seed != null) s.seed = req.seed;
  if (maxTokens != null) s.max_tokens = maxTokens;
  if (req.stop != null) {
    // OpenAI ignores empty stop strings; the protocol rejects them.
    const stop = (typeof req.stop === "string" ? [req.stop] : req.stop).filter((x) => x !== "");
    if (stop.length > 0) s.stop = stop;
  }
  if (req.stop_token_ids != null) s.stop_token_ids = req.stop_token_ids;
  if (req.ignore_eos != null) s.ignore_eos = req.ignore_eos;
  if (logprobs.logprobs) {
    s.logprobs = true;
    s.top_logprobs = logprobs.topLogprobs;
  }
  return s;
}
