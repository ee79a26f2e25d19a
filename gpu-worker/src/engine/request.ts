import type { SeededRng } from "./seeded-rng.ts";
import type { FinishReason, SamplingParams } from "./types.ts";

export enum RequestStatus {
  WAITING = 0,
  RUNNING = 1,
  /** Blocks were taken back; it waits to recompute its tokens (prompt and output so far). */
  PREEMPTED = 2,
  // Ordered so that "finished" is one comparison.
  FINISHED_STOPPED = 3,
  FINISHED_LENGTH = 4,
  FINISHED_ABORTED = 5,
}

export const isFinished = (s: RequestStatus) => s >= RequestStatus.FINISHED_STOPPED;

export function finishReasonOf(s: RequestStatus): FinishReason {
  if (s === RequestStatus.FINISHED_STOPPED) return "stop";
  if (s === RequestStatus.FINISHED_LENGTH) return "length";
  return "abort";
}

/** One generation request's scheduling state. The scheduler and the engine mutate it; nothing else does. */
export class Request {
  status = RequestStatus.WAITING;
  readonly outputTokenIds: number[] = [];
  /** Prompt then output tokens, grown in place (not rebuilt each step). */
  readonly tokenIds: number[];
  /** Tokens whose KV is in the cache. Prefill and decode are the same thing: this catching up with numTokens. */
  numComputedTokens = 0;
  /** Prompt tokens served from the prefix cache at first admission (reported as cached_tokens). */
  numCachedTokens = -1;
  numPreemptions = 0;

  constructor(
    readonly requestId: string,
    readonly promptTokenIds: readonly number[],
    readonly params: SamplingParams,
    readonly rng: SeededRng | null,
    /** The most tokens this request may ever hold (prompt + output), from max_tokens and the context. */
    readonly maxTotalTokens: number,
    /** FCFS order. */
    readonly arrival: number,
  ) {
    this.tokenIds = [...promptTokenIds];
  }

  get numTokens(): number {
    return this.tokenIds.length;
  }

  tokenAt(i: number): number {
    return this.tokenIds[i];
  }

  /** Append a sampled token (kept in both lists: penalties read the output alone, hashing reads all). */
  appendOutput(tokenId: number): void {
    this.outputTokenIds.push(tokenId);
    this.tokenIds.push(tokenId);
  }
}
