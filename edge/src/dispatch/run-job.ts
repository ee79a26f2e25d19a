/**
 * Runs a job: one sub-request per choice (n per prompt) through a `SubmitBackend`, events merged into one stream,
 * the next candidate pool tried when a worker finds the prompt too long for its context, the whole job bounded by
 * its deadline, and the key's reservation settled when it ends, whether it completed, failed or was cancelled.
 *
 * NOTE: settlement happens here, in the code that receives the workers' final events, and never depends on the
 * client: a client that disconnects aborts `signal`, the sub-requests are cancelled at the workers, and the
 * `finally` below still settles what was used (the generator is driven to its end by the Durable Object, not by
 * the client). Tokens a cancelled choice streamed are counted from its deltas.
 *
 * @module
 */
import {
  CancelledError,
  DispatchError,
  type DispatchEvent,
  InvalidRequestError,
  Mailbox,
  NoWorkersError,
  ProtocolError,
  QueueTimeoutError,
  RequestTooLargeError,
  type SubmitRequest,
  type Usage,
  WorkerError,
  WorkerLostError,
} from "@llama-edge/shared";
import type { ApiErrorInfo } from "../errors.ts";
import {
  decodeEvents,
  encodeEvent,
  type Job,
  type JobEvent,
  type JobRunner,
  type Limiter,
  type SubmitBackend,
} from "./job.ts";

export interface RunJobDeps {
  backend: SubmitBackend;
  limiter: Limiter;
  /** Where settlement failures go (they must never fail the job). */
  log?: (msg: string, err: unknown) => void;
}

/** The abort reason when a job outlives its deadline. */
class DeadlineReached extends Error {}

interface Choice {
  index: number;
  promptIndex: number;
  /** Completion tokens seen in deltas: the count when no final event arrives. */
  numTokens: number;
  usage?: Usage;
}

/** The worker error that means "the prompt does not fit this pool's context". */
export const isContextLengthError = (e: unknown): boolean =>
  e instanceof WorkerError && e.code === "context_length_exceeded";

export async function* runJob(job: Job, deps: RunJobDeps, signal: AbortSignal): AsyncGenerator<JobEvent> {
  const ac = new AbortController();
  const onAbort = () => ac.abort(signal.reason);
  if (signal.aborted) onAbort();
  signal.addEventListener("abort", onAbort, { once: true });
  const deadlineTimer = setTimeout(
    () => ac.abort(new DeadlineReached()),
    Math.max(0, Math.min(job.deadline - Date.now(), 2 ** 31 - 1)),
  );

  const queue = new Mailbox<JobEvent | null>(); // null: one choice is done
  const choices: Choice[] = job.prompts.flatMap((_, promptIndex) =>
    Array.from({ length: job.n }, (_, i) => ({ index: promptIndex * job.n + i, promptIndex, numTokens: 0 })),
  );
  let failure: unknown;
  const runs = choices.map((ch) =>
    runChoice(job, ch, deps.backend, ac.signal, (ev) => queue.push(ev))
      .catch((e) => {
        failure ??= e;
        ac.abort(e); // one choice failed: the others are cancelled, the client gets one error
      })
      .finally(() => queue.push(null)),
  );

  let settled = false;
  const settle = async () => {
    if (settled) return;
    settled = true;
    try {
      await deps.limiter.settle(job.keyHash, job.reservationId, { model: job.model, ...totalUsage(job, choices) });
    } catch (e) {
      deps.log?.(`settling ${job.id} failed`, e);
    }
  };
  try {
    let remaining = choices.length;
    // Held until every choice has produced output: a choice the worker refuses (a token id outside the
    // vocabulary, say) must fail the whole request with an HTTP error, not after another choice's tokens went out.
    let held: JobEvent[] | null = [];
    const producing = new Set<number>();
    while (remaining > 0) {
      const ev = await queue.next();
      if (ev === null) remaining--;
      else if (failure !== undefined) continue;
      else if (held === null) yield ev;
      else {
        held.push(ev);
        if (ev.type === "delta" || ev.type === "final") producing.add(ev.index);
        if (producing.size === choices.length) {
          yield* held;
          held = null;
        }
      }
    }
    if (failure === undefined && held !== null) yield* held;
    // Settled before the last event: once a client has its whole response, its concurrency slot is free and
    // the ledger includes it.
    await settle();
    if (failure !== undefined) {
      yield { type: "error", error: toErrorInfo(failure, ac.signal.reason) };
    } else {
      yield { type: "end", usage: totalUsage(job, choices) };
    }
  } finally {
    ac.abort(new CancelledError("job ended", job.id));
    await Promise.allSettled(runs);
    clearTimeout(deadlineTimer);
    signal.removeEventListener("abort", onAbort);
    await settle(); // the reader left early: the choices were cancelled above, settle what they used
  }
}

async function runChoice(
  job: Job,
  ch: Choice,
  backend: SubmitBackend,
  signal: AbortSignal,
  emit: (ev: JobEvent) => void,
): Promise<void> {
  const choiceInPrompt = ch.index % job.n;
  const seed = job.sampling.seed;
  for (let p = 0; p < job.pools.length; p++) {
    const pool = job.pools[p]!;
    const request: SubmitRequest = {
      id: p === 0 ? `${job.id}-${ch.index}` : `${job.id}-${ch.index}-p${p}`,
      model: job.model,
      prompt: job.prompts[ch.promptIndex]!,
      // Each choice of a seeded request gets its own seed: reproducible, yet the n choices differ.
      sampling: seed == null ? job.sampling : { ...job.sampling, seed: seed + choiceInPrompt },
      deadline: job.deadline,
    };
    let sawTokens = false;
    try {
      // A cancelled choice's exact usage still arrives in the worker's final `abort` event: settle from it.
      const onCancelledFinal = (f: Extract<DispatchEvent, { type: "final" }>) => {
        ch.usage = f.usage;
      };
      for await (const ev of backend.submit(pool, request, { signal, onCancelledFinal })) {
        if (ev.type === "start") {
          emit({ type: "start", index: ch.index, worker_id: ev.worker_id, pool });
        } else if (ev.type === "delta") {
          sawTokens = true;
          ch.numTokens += ev.token_ids.length;
          emit({
            type: "delta",
            index: ch.index,
            text: ev.text,
            num_tokens: ev.token_ids.length,
            ...(ev.logprobs ? { logprobs: ev.logprobs } : {}),
          });
        } else if (ev.type === "final") {
          ch.usage = ev.usage;
          emit({ type: "final", index: ch.index, finish_reason: ev.finish_reason, usage: ev.usage });
        }
      }
      return;
    } catch (e) {
      // Too long for this pool's context: a pool with a larger one may take it (nothing was streamed yet).
      if (isContextLengthError(e) && !sawTokens && p + 1 < job.pools.length && !signal.aborted) continue;
      throw e;
    }
  }
}

/**
 * What the job used. Prompt tokens count once per prompt whatever `n` (as OpenAI bills), from a worker's final
 * event when one arrived, else from the admission estimate if the prompt was processed (tokens came out).
 */
export function totalUsage(job: Job, choices: Choice[]): Usage {
  const usage: Usage = { prompt_tokens: 0, completion_tokens: 0, cached_tokens: 0 };
  job.prompts.forEach((_, promptIndex) => {
    const mine = choices.filter((c) => c.promptIndex === promptIndex);
    const reported = mine.find((c) => c.usage)?.usage;
    if (reported) {
      usage.prompt_tokens += reported.prompt_tokens;
      usage.cached_tokens += reported.cached_tokens;
    } else if (mine.some((c) => c.numTokens > 0)) {
      usage.prompt_tokens += job.estimatedPromptTokens[promptIndex] ?? 0;
    }
  });
  for (const c of choices) usage.completion_tokens += c.usage?.completion_tokens ?? c.numTokens;
  return usage;
}

// ---------------------------------------------------------------------------------------------------------------
// Errors

function err(status: number, message: string, code: string, type?: string, param: string | null = null): ApiErrorInfo {
  return { status, message, type: type ?? (status >= 500 ? "server_error" : "invalid_request_error"), param, code };
}

/** Maps a dispatch failure to the OpenAI error the client gets. */
export function toErrorInfo(e: unknown, abortReason?: unknown): ApiErrorInfo {
  if (abortReason instanceof DeadlineReached || e instanceof DeadlineReached) {
    return err(504, "The request did not complete before its deadline.", "timeout");
  }
  if (e instanceof CancelledError) return err(499, "The request was cancelled.", "cancelled");
  if (e instanceof QueueTimeoutError) {
    return err(504, "No worker could start the request before its deadline; try again later.", "timeout");
  }
  if (e instanceof NoWorkersError) {
    return err(503, "No worker is available to serve this model right now; try again later.", "service_unavailable");
  }
  if (e instanceof WorkerLostError) {
    return err(502, "The worker serving the request stopped responding.", "worker_lost");
  }
  if (e instanceof ProtocolError) return err(502, "The worker sent an invalid response.", "bad_gateway");
  if (e instanceof RequestTooLargeError) return err(413, "The request is too large to dispatch.", "request_too_large");
  if (e instanceof InvalidRequestError) return err(400, e.message, "invalid_request");
  if (e instanceof WorkerError) {
    switch (e.code) {
      case "context_length_exceeded":
        return err(400, e.message, "context_length_exceeded", undefined, "messages");
      case "bad_request":
        return err(400, e.message, "invalid_request");
      case "too_large":
        return err(413, e.message, "request_too_large");
      case "model_not_found":
        return err(404, e.message, "model_not_found", undefined, "model");
      case "deadline_exceeded":
        return err(504, e.message, "timeout");
      case "unavailable":
        return err(503, e.message, "service_unavailable");
      case "worker_lost":
        return err(502, e.message, "worker_lost");
      default:
        return err(500, "The worker failed while processing the request.", "internal_error");
    }
  }
  if (e instanceof DispatchError) return err(e.status >= 400 ? e.status : 500, e.message, e.code);
  return err(500, "The server had an error while processing your request.", "internal_error");
}

/**
 * Runs the job to its end on its own, whatever the reader does, and streams its events as NDJSON. This is what a
 * dispatch shard returns over RPC: the loop below (not the client) drives `runJob`, so settlement happens even
 * when the reader is gone. Cancelling the stream cancels the job.
 */
export function jobStream(
  job: Job,
  deps: RunJobDeps,
  ac = new AbortController(),
  onEnd?: () => void,
): ReadableStream<Uint8Array> {
  let cancelled = false;
  return new ReadableStream<Uint8Array>({
    start(controller) {
      void (async () => {
        try {
          for await (const ev of runJob(job, deps, ac.signal)) if (!cancelled) controller.enqueue(encodeEvent(ev));
        } catch (e) {
          deps.log?.(`job ${job.id} failed`, e);
          if (!cancelled) controller.enqueue(encodeEvent({ type: "error", error: toErrorInfo(e) }));
        } finally {
          if (!cancelled) controller.close();
          onEnd?.();
        }
      })();
    },
    cancel(reason) {
      cancelled = true;
      ac.abort(new CancelledError(`the reader cancelled: ${String(reason)}`, job.id));
    },
  });
}

/** Runs jobs in this isolate (tests, single-process setups); production uses the dispatch shards. */
export class LocalJobRunner implements JobRunner {
  constructor(private readonly deps: RunJobDeps) {}

  run(job: Job, signal: AbortSignal): AsyncIterable<JobEvent> {
    return decodeEvents(jobStream(job, this.deps), signal);
  }
}
