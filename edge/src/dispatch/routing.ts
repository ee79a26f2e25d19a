/**
 * Which pools may take a request, from its model and length. The gateway has no tokenizer (templates and
 * tokenizers stay with the workers, see shared/src/protocol.ts), so a text prompt's length is an estimate that
 * errs high; token-id prompts are counted exactly. A pool whose worker finds the prompt too long after all
 * answers with context_length_exceeded, and the job moves on to the next (larger) pool.
 *
 * @module
 */
import type { Prompt } from "@llama-edge/shared";
import { type GatewayConfig, poolsFor } from "../config.ts";
import { type ApiError, errors } from "../errors.ts";

export interface PromptEstimate {
  tokens: number;
  /** True for token-id prompts: `tokens` is the count, not an estimate. */
  exact: boolean;
}

/** UTF-8 bytes per token assumed for text: low (LLaMA averages ~4 for English) so the estimate errs high. */
const BYTES_PER_TOKEN = 3;
/** Template tokens around each chat message ([INST], role headers, eos...). */
const CHAT_MESSAGE_OVERHEAD = 8;

const utf8Length = (s: string): number => new TextEncoder().encode(s).byteLength;

export function estimatePromptTokens(prompt: Prompt): PromptEstimate {
  switch (prompt.type) {
    case "tokens":
      return { tokens: prompt.token_ids.length, exact: true };
    case "text":
      return { tokens: 1 + Math.ceil(utf8Length(prompt.text) / BYTES_PER_TOKEN), exact: false };
    case "chat": {
      let tokens = 2;
      for (const m of prompt.messages) {
        const calls = m.tool_calls?.map((c) => c.function.name + c.function.arguments).join("") ?? "";
        tokens += CHAT_MESSAGE_OVERHEAD + Math.ceil(utf8Length((m.content ?? "") + calls) / BYTES_PER_TOKEN);
      }
      // Tool definitions are rendered into the prompt by the chat template.
      if (prompt.tools) tokens += Math.ceil(utf8Length(JSON.stringify(prompt.tools)) / BYTES_PER_TOKEN);
      return { tokens, exact: false };
    }
  }
}

/**
 * Candidate pools for a request, smallest fitting context first (big contexts stay free for long prompts).
 * Fails with model_not_found, or context_length_exceeded when the prompt is known not to fit anywhere.
 */
export function planPools(
  config: GatewayConfig,
  model: string,
  prompts: PromptEstimate[],
  maxTokens: number | null,
  param: "messages" | "prompt",
): { pools: string[] } | { error: ApiError } {
  const pools = poolsFor(config, model);
  if (pools.length === 0) return { error: errors.modelNotFound(model) };
  const longest = prompts.reduce((a, b) => (b.tokens > a.tokens ? b : a));
  // At least one token must fit after the prompt (the engine's own rule).
  const need = longest.tokens + (maxTokens ?? 1);
  const fitting = pools.filter((p) => p.maxContext >= need).map((p) => p.name);
  if (fitting.length > 0) return { pools: fitting };
  const largest = pools[pools.length - 1]!;
  if (longest.exact) {
    return {
      error: errors.contextLengthExceeded(
        `This model's maximum context length is ${largest.maxContext} tokens. However, you requested ${need} ` +
          `tokens (${longest.tokens} in the ${param}, ${maxTokens ?? 1} in the completion). Please reduce the ` +
          `length of the ${param} or completion.`,
        param,
      ),
    };
  }
  // Only an estimate says it does not fit: let the largest pool's worker decide with the real token count.
  return { pools: [largest.name] };
}
