/**
 * Runs a job: one sub-request per choice (n per prompt) through a `SubmitBackend`, events merged into one stream,
 * the next candidate pool tried when a worker finds the prompt too long for its context, the whole job bounded by
 * its deadline, and the key's reservation settled when it ends, whether it completed, failed or was cancelled.
 *
 * NOTE: settlement happens here, in the code that receives the workers' final events, and never depends on the
 * client: a client that disconnects aborts `signal`, the sub-requests are cancelled at the workers, and the
 * `finally` below still settles what was used (the generator is driven to its end by the Durable Object, not by
 * the client). Tokens a cancelled choice streamed are counted from its deltas. While it runs, the job renews its
 * reservation's lease with the usage so far, so that even this code dying loses nothing (see KeyLimiter).
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
  queuedIdAfterOffer,
  RequestTooLargeError,
  type SubmitRequest,
  WorkerError,
  WorkerLostError,
} from "@llama-edge/shared";
import type { ApiErrorInfo } from "../errors.ts";
import type { Job, JobEvent, Limiter, SubmitBackend } from "./job.ts";
import { UsageTally } from "./usage-tally.ts";

export interface RunJobDeps {
  backend: SubmitBackend;
  limiter: Limiter;
  /** Where settlement failures go (they must never fail the job). */
  log?: (msg: string, err: unknown) => void;
}

/** The abort reason when a job outlives its deadline. */
class DeadlineReached extends Error {}

/** The id of choice `index`'s request to the job's `p`-th pool. */
const subRequestId = (job: Pick<Job, "id">, index: number, p: number): string =>
  p === 0 ? `${job.id}-${index}` : `${job.id}-${index}-p${p}`;

/** Every request id a job may have sent to a worker, with its pool: what to cancel when its runner is gone. */
export function subRequests(job: Pick<Job, "id" | "pools" | "prompts" | "n">): { pool: string; id: string }[] {
  const out: { pool: string; id: string }[] = [];
  for (let index = 0; index < job.prompts.length * job.n; index++) {
    job.pools.forEach((pool, p) => {
      const id = subRequestId(job, index, p);
      out.push({ pool, id }, { pool, id: queuedIdAfterOffer(id) });
    });
  }
  return out;
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
  const tally = new UsageTally(job);
  const numChoices = job.prompts.length * job.n;
  let failure: unknown;
  const runs = Array.from({ length: numChoices }, (_, index) =>
    runChoice(job, index, deps.backend, ac.signal, tally, (ev) => queue.push(ev))
      .catch((e) => {
        failure ??= e;
        ac.abort(e); // one choice failed: the others are cancelled, the client gets one error
      })
      .finally(() => queue.push(null)),
  );

  const usage = () => ({ model: job.model, ...tally.total() });
  // While the job runs its reservation's lease is renewed with the usage so far: should this runner die, the key
  // settles what had been delivered and frees the slots within one lease (see KeyLimiter).
  const renewal = setInterval(
    () => {
      deps.limiter
        .renew(job.keyHash, job.reservationId, usage(), Date.now() + job.leaseMs)
        .catch((e: unknown) => deps.log?.(`renewing ${job.id} failed`, e));
    },
    Math.max(100, Math.floor(job.leaseMs / 3)),
  );
  let settled = false;
  const settle = async () => {
    if (settled) return;
    settled = true;
    clearInterval(renewal);
    try {
      await deps.limiter.settle(job.keyHash, job.reservationId, usage());
    } catch (e) {
      deps.log?.(`settling ${job.id} failed`, e);
    }
  };
  try {
    let remaining = numChoices;
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
        if (producing.size === numChoices) {
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
      yield { type: "end", usage: tally.total() };
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
  index: number,
  backend: SubmitBackend,
  signal: AbortSignal,
  tally: UsageTally,
  emit: (ev: JobEvent) => void,
): Promise<void> {
  const choiceInPrompt = index % job.n;
  const seed = job.sampling.seed;
  for (let p = 0; p < job.pools.length; p++) {
    const pool = job.pools[p]!;
    const request: SubmitRequest = {
      id: subRequestId(job, index, p),
      model: job.model,
      prompt: job.prompts[Math.floor(index / job.n)]!,
      ...job.output,
      // Each choice of a seeded request gets its own seed: reproducible, yet the n choices differ.
      sampling: seed == null ? job.sampling : { ...job.sampling, seed: seed + choiceInPrompt },
      // The start-by time: the worker drops it (and the Dispatcher reports a queue timeout) once it has passed.
      deadline: Math.min(job.deadline, Date.now() + (job.queueTimeoutMs?.[pool] ?? Number.POSITIVE_INFINITY)),
    };
    let sawTokens = false;
    try {
      // A cancelled choice's exact usage still arrives in the worker's final `abort` event: settle from it.
      const onCancelledFinal = (f: Extract<DispatchEvent, { type: "final" }>) => tally.final(index, f.usage);
      for await (const ev of backend.submit(pool, request, { signal, onCancelledFinal })) {
        if (ev.type === "start") {
          emit({ type: "start", index, worker_id: ev.worker_id, pool });
        } else if (ev.type === "delta") {
          sawTokens = true;
          tally.delta(index, ev.token_ids.length);
          emit({
            type: "delta",
            index,
            text: ev.text,
            num_tokens: ev.token_ids.length,
            ...(ev.logprobs ? { logprobs: ev.logprobs } : {}),
            ...(ev.tool_calls ? { tool_calls: ev.tool_calls } : {}),
          });
        } else if (ev.type === "final") {
          tally.final(index, ev.usage);
          emit({ type: "final", index, finish_reason: ev.finish_reason, usage: ev.usage });
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
        return err(400, e.message, "invalid_request", undefined, e.param ?? null);
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
