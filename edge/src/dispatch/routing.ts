/**
 * Which pools may take a request, from its model and length. The gateway has no tokenizer (templates and
 * tokenizers stay with the workers, see shared/src/protocol.ts), so a text prompt's length is an estimate that
 * errs high; token-id prompts are counted exactly. A pool whose worker finds the prompt too long after all
 * answers with context_length_exceeded, and the job moves on to the next (larger) pool.
 *
 * @module
 */
import type { Prompt, RequestMessageInput } from "@llama-edge/shared";
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

/** Tokens a chat template adds per message at most (role headers, separators), and per prompt (bos, the
 *  generation prompt): an assumption about LLaMA-family templates, which add well under this. */
const TEMPLATE_MAX_PER_MESSAGE = 16;
const TEMPLATE_MAX_PER_PROMPT = 16;

/**
 * The most tokens a prompt can have: one per UTF-8 byte (a byte-fallback tokenizer never does worse) plus the
 * template's. Tool definitions and calls count twice their JSON's bytes (templates may indent it). What a budget
 * that must never be overshot reserves.
 */
export function maxPromptTokens(prompt: RequestMessageInput["prompt"]): number {
  switch (prompt.type) {
    case "tokens":
      return prompt.token_ids.length;
    case "text":
      return TEMPLATE_MAX_PER_PROMPT + utf8Length(prompt.text);
    case "chat": {
      const json = (v: unknown) => (v === undefined ? 0 : 2 * utf8Length(JSON.stringify(v)));
      return prompt.messages.reduce(
        (n, m) => n + TEMPLATE_MAX_PER_MESSAGE + utf8Length(m.content ?? "") + json(m.tool_calls),
        TEMPLATE_MAX_PER_PROMPT + json(prompt.tools),
      );
    }
  }
}

/**
 * Bytes per token no LLaMA-family tokenizer exceeds on real text (their longest pieces are whitespace and
 * punctuation runs of ~16 bytes, English averages ~4): a text prompt longer than this many bytes per token of
 * context cannot fit, and is refused without a worker.
 */
const MAX_BYTES_PER_TOKEN = 8;

/** The fewest tokens a prompt can have. */
function minPromptTokens(prompt: Prompt): number {
  switch (prompt.type) {
    case "tokens":
      return prompt.token_ids.length;
    case "text":
      return Math.ceil(utf8Length(prompt.text) / MAX_BYTES_PER_TOKEN);
    case "chat":
      return prompt.messages.reduce((n, m) => n + Math.ceil(utf8Length(m.content ?? "") / MAX_BYTES_PER_TOKEN), 0);
  }
}

export interface PoolRequest {
  model: string;
  prompts: Prompt[];
  /** Completion tokens per choice, and the parameter that set them; null = until the context is full. */
  maxTokens: number | null;
  maxTokensParam: "max_tokens" | "max_completion_tokens";
  promptParam: "messages" | "prompt";
}

/**
 * Candidate pools for a request, smallest fitting context first (big contexts stay free for long prompts).
 * Fails with model_not_found, with invalid_value when max_tokens alone exceeds every context, or with
 * context_length_exceeded when the prompt cannot fit anywhere (counted exactly for token ids, bounded below for
 * text). A text prompt only estimated not to fit goes to the largest pool, whose worker counts it exactly.
 */
export function planPools(
  config: GatewayConfig,
  req: PoolRequest,
): { pools: string[] /** the largest context among them */; maxContext: number } | { error: ApiError } {
  const pools = poolsFor(config, req.model);
  if (pools.length === 0) return { error: errors.modelNotFound(req.model) };
  const largest = pools[pools.length - 1]!;
  const { maxTokens, promptParam } = req;
  if (maxTokens !== null && maxTokens >= largest.maxContext) {
    return {
      error: errors.invalidRequest(
        `'${req.maxTokensParam}' is too large: ${maxTokens}. This model's maximum context length is ` +
          `${largest.maxContext} tokens, prompt included.`,
        req.maxTokensParam,
        "invalid_value",
      ),
    };
  }
  const estimates = req.prompts.map(estimatePromptTokens);
  const longest = estimates.reduce((a, b) => (b.tokens > a.tokens ? b : a));
  // At least one token must fit after the prompt (the engine's own rule).
  const completion = maxTokens ?? 1;
  const need = longest.tokens + completion;
  const fitting = pools.filter((p) => p.maxContext >= need);
  if (fitting.length > 0) return { pools: fitting.map((p) => p.name), maxContext: largest.maxContext };
  const atLeast = Math.max(...req.prompts.map(minPromptTokens));
  if (longest.exact || atLeast + completion > largest.maxContext) {
    const tokens = longest.exact ? `${longest.tokens}` : `at least ${atLeast}`;
    return {
      error: errors.contextLengthExceeded(
        `This model's maximum context length is ${largest.maxContext} tokens. However, you requested ` +
          `${longest.exact ? need : `at least ${atLeast + completion}`} tokens (${tokens} in the ${promptParam}, ` +
          `${completion} in the completion). Please reduce the length of the ${promptParam} or completion.`,
        promptParam,
      ),
    };
  }
  return { pools: [largest.name], maxContext: largest.maxContext };
}
