/**
 * Messages between the service's main thread (engine-host.ts) and the engine thread (engine-thread.ts). Plain data:
 * they cross a `worker_threads` port by structured clone.
 *
 * @module
 */
import type { OutputRequest, ServedEvent } from "../chat/output-plan.ts";
import type { EngineOptions } from "../engine/llm-engine.ts";
import type { EngineRequest, EngineStats } from "../engine/types.ts";
import type { ChatMessage, ChatTool } from "../tokenizer/tokenizer.ts";

/** A chat prompt, rendered in the engine thread because the tokenizer (and its chat template) lives there. */
export interface ChatPrompt {
  messages: ChatMessage[];
  addGenerationPrompt: boolean;
  tools?: ChatTool[];
}

/** A request as the engine thread takes it: the output options become a grammar and a tool-call parser there. */
export type HostRequest = Omit<EngineRequest, "prompt" | "grammar"> & {
  prompt: EngineRequest["prompt"] | ChatPrompt;
  output?: OutputRequest;
};

export interface EngineConfig {
  modelName: string;
  maxModelLen: number;
  maxNumSeqs: number;
  blockSize: number;
  numBlocks: number;
}

/** An error thrown in the engine thread, as far as it survives the trip. */
export interface ThreadError {
  name: string;
  message: string;
  /** EngineRequestError's code, if any. */
  code?: string;
  /** The request field at fault, if the error names one. */
  param?: string;
}

/** What the host passes as workerData. Functions cannot cross, so no onProgress. */
export interface ThreadInit {
  engineOptions: Omit<EngineOptions, "onProgress">;
  /** Module exporting `LLMEngine` (default: ../engine/llm-engine.ts). */
  engineModule: string;
  statsIntervalMs: number;
}

export type HostToThread =
  | { type: "submit"; request: HostRequest }
  | { type: "abort"; requestId: string }
  | { type: "prefixHashes"; callId: number; limit: number };

/** Where the engine's start went: packing the weights (0 when they were packed already), then loading them. */
export interface EngineStartup {
  compileSeconds: number;
  loadSeconds: number;
}

export type ThreadToHost =
  | { type: "ready"; config: EngineConfig; stats: EngineStats; startup: EngineStartup }
  /** Before `ready`: progress of a one-time step (compiling the weights). */
  | { type: "progress"; stage: string; done: number; total: number }
  | { type: "startFailed"; error: ThreadError }
  | { type: "event"; requestId: string; event: ServedEvent }
  /** submit() threw (invalid parameters, prompt too long) or the stream failed. Ends the request. */
  | { type: "failed"; requestId: string; error: ThreadError }
  | { type: "stats"; stats: EngineStats }
  | { type: "prefixHashes"; callId: number; hashes: string[] };
