/**
 * A job is one OpenAI request after validation and admission: its prompts, `n`, sampling parameters, candidate
 * pools and the key reservation to settle. Whoever runs it (a dispatch shard Durable Object in production)
 * yields `JobEvent`s and settles the reservation when the job ends, however it ends.
 *
 * Jobs and events are plain data: they cross the Durable Object RPC boundary, events as NDJSON over a byte stream.
 * The interfaces a job depends on live here too: `Limiter` (admission and settlement with the key) and
 * `SubmitBackend` (one sub-request to one pool).
 *
 * @module
 */
import type {
  DispatchEvent,
  Logprob,
  Prompt,
  SamplingParams,
  SubmitOptions,
  SubmitRequest,
  Usage,
} from "@llama-edge/shared";
import type { ApiErrorInfo } from "../errors.ts";
import type { AdmitRequest, AdmitResult } from "../keys/key-limiter.ts";
import type { Settlement } from "../keys/types.ts";

export interface Job {
  /** Gateway request id; sub-requests to workers are `<id>-<choice index>`. */
  id: string;
  keyHash: string;
  reservationId: string;
  model: string;
  /** Pools to try, in order: the next one is used when a worker finds the prompt too long for its context. */
  pools: string[];
  /** One per prompt; choice index = promptIndex * n + i. */
  prompts: Prompt[];
  n: number;
  sampling: SamplingParams;
  /** Epoch ms: the gateway gives up on the job then, wherever it is. */
  deadline: number;
  /** Per candidate pool: how long a sub-request may wait there for a worker to start it (its pool's
   *  queue_timeout_ms); a pool missing here waits until `deadline`. */
  queueTimeoutMs?: Record<string, number>;
  /** Prompt tokens as estimated at admission, per prompt: usage of prompts that never reported their own. */
  estimatedPromptTokens: number[];
  /** The reservation's lease: the runner renews it (with the usage so far) well within this many ms. */
  leaseMs: number;
  /** What the reader may leave unread before the job is cancelled (see job-stream.ts); default 1 MiB, 30 s. */
  reader?: { maxBufferedBytes: number; idleReaderMs: number };
}

export type JobEvent =
  /** A worker started choice `index`. */
  | { type: "start"; index: number; worker_id: string; pool: string }
  | { type: "delta"; index: number; text: string; num_tokens: number; logprobs?: Logprob[] }
  | { type: "final"; index: number; finish_reason: "stop" | "length" | "abort" | "tool_calls"; usage: Usage }
  /** Terminal: the job failed; nothing follows. */
  | { type: "error"; error: ApiErrorInfo }
  /** Terminal: every choice finished; `usage` is what was settled. */
  | { type: "end"; usage: Usage };

/** Runs jobs: `createApp` depends on this, a dispatch shard (or a test double) implements it. */
export interface JobRunner {
  /**
   * Aborting `signal` cancels the job at the workers; the runner still settles its usage. `waitUntil` (the
   * request's ExecutionContext) keeps that cancel alive after the client has gone.
   */
  run(job: Job, signal: AbortSignal, waitUntil?: (p: Promise<unknown>) => void): AsyncIterable<JobEvent>;
}

/** Admission and settlement with a key (its Durable Object in production). */
export interface Limiter {
  /** Authenticates and admits in one round trip (see KeyLimiter.admit). */
  admit(keyHash: string, req: AdmitRequest): Promise<AdmitResult>;
  /** Idempotent: settling a settled or unknown reservation does nothing. */
  settle(keyHash: string, reservationId: string, settlement: Settlement): Promise<void>;
  /** Extends a running request's lease, recording its usage so far (see KeyLimiter.renew). */
  renew(keyHash: string, reservationId: string, progress: Settlement, leaseUntil: number): Promise<boolean>;
}

/** Submits one request to one pool (the shared Dispatcher's shape, plus prefix-affinity routing in production). */
export interface SubmitBackend {
  submit(
    pool: string,
    request: SubmitRequest,
    options: SubmitOptions & { signal: AbortSignal },
  ): AsyncIterable<DispatchEvent>;
}

// ---------------------------------------------------------------------------------------------------------------
// NDJSON over a byte stream

const encoder = new TextEncoder();

export const encodeEvent = (ev: JobEvent): Uint8Array => encoder.encode(`${JSON.stringify(ev)}\n`);

/**
 * Decodes an NDJSON byte stream into events. Aborting `signal` cancels the stream, unless `cancelOnAbort` is
 * false: an RPC stream whose reader's request was cancelled by a client disconnect cannot be cancelled (workerd
 * reports "Network connection lost"), and its producer is told through its own cancel call instead.
 */
export async function* decodeEvents(
  stream: ReadableStream<Uint8Array>,
  signal: AbortSignal,
  { cancelOnAbort = true } = {},
): AsyncGenerator<JobEvent> {
  const reader = stream.getReader();
  const onAbort = () => {
    if (cancelOnAbort) void reader.cancel(signal.reason).catch(() => {});
  };
  if (signal.aborted) onAbort();
  signal.addEventListener("abort", onAbort, { once: true });
  const decoder = new TextDecoder();
  let buf = "";
  let ended = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        ended = true;
        break;
      }
      buf += decoder.decode(value, { stream: true });
      let nl = buf.indexOf("\n");
      while (nl >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line) yield JSON.parse(line) as JobEvent;
        nl = buf.indexOf("\n");
      }
    }
  } finally {
    signal.removeEventListener("abort", onAbort);
    // The consumer left early (or decoding failed): tell the producer, which cancels the job at the workers.
    if (!ended) await reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}
