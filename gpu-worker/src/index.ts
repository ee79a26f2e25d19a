/**
 * The worker package's public API: the engine for embedding, the model loaders for tools.
 * @module
 */
export { type EngineOptions, EngineRequestError, LLMEngine } from "./engine/llm-engine.ts";
export { SamplingParamError } from "./engine/sampling-params.ts";
export type {
  EngineEvent,
  EngineRequest,
  EngineStats,
  FinishReason,
  SamplingParams,
  TokenLogprob,
  Usage,
} from "./engine/types.ts";
export { type LlamaConfig, loadLlamaConfig } from "./model/config.ts";
export { ensureDefaultModel } from "./model/default-model.ts";
export { ModelLoadError } from "./model/errors.ts";
export { writeRandomLlama } from "./model/random-model.ts";
export { type ChatMessage, ChatTemplateError, LlamaTokenizer } from "./tokenizer/tokenizer.ts";
