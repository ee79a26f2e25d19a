/**
 * Between the wire protocol (snake_case, OpenAI/vLLM names) and the engine (camelCase): requests in, logprobs and
 * usage out. Absent sampling parameters stay absent so the engine's defaults apply; the engine validates values.
 *
 * @module
 */
import type {
  Logprob,
  RequestMessage,
  SamplingParams as WireSamplingParams,
  Usage as WireUsage,
} from "@llama-edge/shared";
import type { OutputRequest } from "../chat/output-plan.ts";
import type { SamplingParams, TokenLogprob, Usage } from "../engine/types.ts";
import type { HostRequest } from "./engine-host.ts";

const SAMPLING_KEYS: { [K in keyof WireSamplingParams]-?: keyof SamplingParams } = {
  temperature: "temperature",
  top_p: "topP",
  top_k: "topK",
  min_p: "minP",
  repetition_penalty: "repetitionPenalty",
  presence_penalty: "presencePenalty",
  frequency_penalty: "frequencyPenalty",
  logit_bias: "logitBias",
  seed: "seed",
  max_tokens: "maxTokens",
  stop: "stop",
  stop_token_ids: "stopTokenIds",
  ignore_eos: "ignoreEos",
  logprobs: "logprobs",
  top_logprobs: "topLogprobs",
};

export function toHostRequest(req: RequestMessage): HostRequest {
  const sampling: Record<string, unknown> = {};
  for (const [wire, key] of Object.entries(SAMPLING_KEYS)) {
    const v = req.sampling[wire as keyof WireSamplingParams];
    if (v !== undefined) sampling[key] = v;
  }
  if (req.sampling.logit_bias) {
    sampling.logitBias = Object.fromEntries(Object.entries(req.sampling.logit_bias).map(([k, v]) => [Number(k), v]));
  }
  const p = req.prompt;
  const prompt =
    p.type === "text"
      ? p.text
      : p.type === "tokens"
        ? p.token_ids
        : {
            messages: p.messages,
            addGenerationPrompt: p.add_generation_prompt,
            ...(p.tools ? { tools: p.tools } : {}),
          };
  return { requestId: req.id, prompt, sampling: sampling as Partial<SamplingParams>, output: toOutputRequest(req) };
}

function toOutputRequest(req: RequestMessage): OutputRequest {
  const f = req.response_format;
  const out: OutputRequest = {};
  if (f) out.responseFormat = f.type === "json_schema" ? { type: "json_schema", schema: f.json_schema.schema } : f;
  const choice = req.tool_choice;
  if (choice !== undefined) out.toolChoice = typeof choice === "string" ? choice : { name: choice.function.name };
  if (req.parallel_tool_calls !== undefined) out.parallelToolCalls = req.parallel_tool_calls;
  return out;
}

export function toWireLogprob(l: TokenLogprob): Logprob {
  return {
    token_id: l.tokenId,
    token: l.token,
    bytes: l.bytes,
    logprob: l.logprob,
    ...(l.topLogprobs
      ? {
          top_logprobs: l.topLogprobs.map((t) => ({
            token_id: t.tokenId,
            token: t.token,
            bytes: t.bytes,
            logprob: t.logprob,
          })),
        }
      : {}),
  };
}

export function toWireUsage(u: Usage): WireUsage {
  return { prompt_tokens: u.promptTokens, completion_tokens: u.completionTokens, cached_tokens: u.cachedTokens };
}
