import type { GrammarSpec } from "./grammar.ts";

/**
 * The engine's in-process API, as the worker service (and the CLI) use it. Protocol types that cross the
 * edge/worker boundary live in `shared/`; these are the engine's own.
 */

/** Sampling parameters of one request, after validation and defaults (see sampling-params.ts `validateSamplingParams`). */
export interface SamplingParams {
  /** 0 = greedy. */
  temperature: number;
  topP: number;
  /** 0 or -1 = disabled. */
  topK: number;
  minP: number;
  repetitionPenalty: number;
  presencePenalty: number;
  frequencyPenalty: number;
  /** token id -> bias added to its logit before sampling. */
  logitBias: Record<number, number>;
  /** Same seed and parameters give the same tokens whatever else is in the batch; null = random. */
  seed: number | null;
  /** null = until the context is full. */
  maxTokens: number | null;
  /** Generation stops before any of these strings; the stop string itself is not emitted. */
  stop: string[];
  stopTokenIds: number[];
  /** Keep generating past eos (benchmarks). */
  ignoreEos: boolean;
  /** Return the sampled token's logprob. */
  logprobs: boolean;
  /** How many alternatives to return with each sampled token (0..20). */
  topLogprobs: number;
}

export interface EngineRequest {
  requestId: string;
  /** Text (the tokenizer adds bos per tokenizer_config) or token ids used as they are. */
  prompt: string | number[];
  sampling?: Partial<SamplingParams>;
  /** Constrain the output to a grammar (structured output, tool calls); it ends with `stop` when complete. */
  grammar?: GrammarSpec;
}

export interface TokenLogprob {
  tokenId: number;
  /** The token's text as it appears mid-sequence (leading space included). */
  token: string;
  /** Its UTF-8 bytes (exact also for a piece of a multi-byte character). */
  bytes: number[];
  logprob: number;
  topLogprobs?: { tokenId: number; token: string; bytes: number[]; logprob: number }[];
}

export type FinishReason = "stop" | "length" | "abort";

export interface Usage {
  promptTokens: number;
  completionTokens: number;
  /** Prompt tokens whose KV came from the prefix cache (their prefill was skipped). */
  cachedTokens: number;
}

export type EngineEvent =
  | { type: "delta"; text: string; tokenIds: number[]; logprobs?: TokenLogprob[] }
  | { type: "final"; finishReason: FinishReason; usage: Usage; promptTokenIds: number[] };

export interface EngineStats {
  running: number;
  waiting: number;
  /** Sequences preempted (recompute) since start. */
  preempted: number;
  kvBlocksTotal: number;
  kvBlocksUsed: number;
  kvBlocksFree: number;
  /** Free blocks that still hold reusable prefix-cache content. */
  kvBlocksCached: number;
  blockSize: number;
  /** Cached prompt tokens / prompt tokens looked up, since start. */
  prefixCacheHitRate: number;
  /** Generated tokens per second over the last few seconds. */
  tokensPerSecond: number;
}
