/**
 * What chat completions and completions share once their bodies are validated: pool planning, admission with the
 * key, running the job, and answering with one JSON object or a Server-Sent Events stream.
 *
 * The response is committed at the job's first token (or its end), not at submission: failures before that (no
 * worker, queue timeout, prompt too long for every pool) come back as proper HTTP errors even with `stream: true`.
 * After that an error can only be a final SSE `data: {"error": ...}` event, after which the stream ends.
 *
 * @module
 */
import type { Prompt, SamplingParams, Usage } from "@llama-edge/shared";
import type { Context } from "hono";
import type { RequestIdVariables } from "hono/request-id";
import type { GatewayConfig } from "./config.ts";
import type { Job, JobEvent, JobRunner, Limiter } from "./dispatch/job.ts";
import { estimatePromptTokens, maxPromptTokens, planPools } from "./dispatch/routing.ts";
import { ApiError, type ApiErrorInfo, errorBody, errors } from "./errors.ts";
import type { AuthVars } from "./middleware/auth.ts";
import type { JsonBodyVars } from "./middleware/json-body.ts";
import { type FormatterOptions, newCompletionId, type ResponseFormatter } from "./openai/format.ts";
import { MAX_SEQUENCES } from "./openai/schemas.ts";
import { admissionError, rateLimitHeaders } from "./rate-limit.ts";

export interface InferenceDeps {
  limiter: Limiter;
  dispatcher: JobRunner;
  config: GatewayConfig;
}

/** A validated request, endpoint-independent. */
export interface InferencePlan {
  kind: "chat" | "completion";
  model: string;
  prompts: Prompt[];
  n: number;
  sampling: SamplingParams;
  /** Completion tokens allowed per choice; null = until the context is full. */
  maxTokens: number | null;
  /** The parameter that set maxTokens (chat has two names for it). */
  maxTokensParam: "max_tokens" | "max_completion_tokens";
  stream: boolean;
  includeUsage: boolean;
  logprobs: boolean;
  makeFormatter(o: FormatterOptions): ResponseFormatter;
}

export const SSE_HEADERS: Record<string, string> = {
  "content-type": "text/event-stream; charset=utf-8",
  // no-transform: proxies must not compress (which buffers); x-accel-buffering: nginx-style proxies must not buffer.
  "cache-control": "no-cache, no-transform",
  "x-accel-buffering": "no",
};

/** Reservations outlive the deadline by this much at most, renewed or not. */
const RESERVATION_GRACE_MS = 60_000;

export async function runInference(
  c: Context<{ Variables: AuthVars & JsonBodyVars & RequestIdVariables }>,
  deps: InferenceDeps,
  plan: InferencePlan,
): Promise<Response> {
  const { config, limiter, dispatcher } = deps;
  const numChoices = plan.prompts.length * plan.n;
  if (numChoices > MAX_SEQUENCES) {
    throw errors.invalidRequest(
      `Too many choices: ${plan.prompts.length} prompt(s) × n=${plan.n} = ${numChoices}, at most ${MAX_SEQUENCES} per request.`,
      "n",
      "invalid_value",
    );
  }
  const routed = planPools(config, {
    model: plan.model,
    prompts: plan.prompts,
    maxTokens: plan.maxTokens,
    maxTokensParam: plan.maxTokensParam,
    promptParam: plan.kind === "chat" ? "messages" : "prompt",
  });
  if ("error" in routed) throw routed.error;
  const estimates = plan.prompts.map(estimatePromptTokens);

  const promptTokens = estimates.reduce((s, e) => s + e.tokens, 0);
  const reserve = promptTokens + numChoices * (plan.maxTokens ?? config.default_completion_reserve);
  const now = Date.now();
  // A pool scaled to zero answers after a cold start: its queue wait comes on top of the request's own time.
  const queueTimeoutMs = Object.fromEntries(routed.pools.map((p) => [p, config.pools[p]?.queue_timeout_ms ?? 0]));
  const deadline = now + Math.max(0, ...Object.values(queueTimeoutMs)) + config.request_timeout_ms;
  const keyHash = c.get("keyHash");
  const admitted = await limiter.admit(keyHash, {
    model: plan.model,
    tokens: reserve,
    sequences: numChoices,
    budget: {
      promptTokens: plan.prompts.reduce((n, p) => n + maxPromptTokens(p), 0),
      choices: numChoices,
      maxTokens: plan.maxTokens,
      maxContext: routed.maxContext,
    },
    leaseUntil: now + config.reservation_lease_ms,
    expiresAt: deadline + RESERVATION_GRACE_MS,
  });
  if (!admitted.ok) {
    if (admitted.key) c.set("key", admitted.key); // authenticated after all: no second round trip for the error
    throw admissionError(admitted, c.get("keyHint"), plan.model);
  }
  c.set("key", admitted.key);

  // The job is named by the request id (x-request-id): the workers' request ids, in their logs, start with it.
  const id = c.get("requestId");
  const headers: Record<string, string> = rateLimitHeaders(admitted.rate);
  const job: Job = {
    id,
    keyHash,
    reservationId: admitted.reservationId,
    model: plan.model,
    pools: routed.pools,
    prompts: plan.prompts,
    n: plan.n,
    // A budget with too little left for a request without max_tokens capped it (finish_reason "length" says so).
    sampling: admitted.maxTokens === undefined ? plan.sampling : { ...plan.sampling, max_tokens: admitted.maxTokens },
    deadline,
    queueTimeoutMs,
    estimatedPromptTokens: estimates.map((e) => e.tokens),
    leaseMs: config.reservation_lease_ms,
    reader: { maxBufferedBytes: config.max_unread_bytes, idleReaderMs: config.idle_reader_timeout_ms },
  };

  // Aborted when the client goes away (request.signal) or cancels the stream: cancels the job at the workers.
  const ac = new AbortController();
  const clientSignal = c.req.raw.signal;
  const onClientGone = () => ac.abort(new Error("client disconnected"));
  if (clientSignal.aborted) onClientGone();
  clientSignal.addEventListener("abort", onClientGone, { once: true });

  let events: AsyncIterator<JobEvent>;
  let first: JobEvent;
  const workers = new Set<string>();
  try {
    const waitUntil = (p: Promise<unknown>) => {
      try {
        c.executionCtx.waitUntil(p);
      } catch {
        // no ExecutionContext (app.request() in tests)
      }
    };
    events = dispatcher.run(job, ac.signal, waitUntil)[Symbol.asyncIterator]();
    first = await nextCommitting(events, (ev) => workers.add(ev.worker_id));
  } catch (e) {
    // The runner failed before any event (dispatch shard unreachable): free the reservation here. Settling is
    // idempotent: if the shard did run the job and settles it, whichever comes first counts.
    await limiter
      .settle(keyHash, admitted.reservationId, {
        model: plan.model,
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_tokens: 0,
      })
      .catch(() => {});
    if (ac.signal.aborted) throw errors.clientClosed(); // nobody is waiting for an answer
    console.error(`job ${id}: dispatch failed`, e);
    throw errors.serviceUnavailable("The gateway could not dispatch the request; try again later.");
  }
  if (first.type === "error") {
    await events.return?.();
    throw errorFromInfo(first.error, headers);
  }
  if (config.expose_worker_id && workers.size > 0) headers["x-llama-edge-worker"] = [...workers].join(",");

  const formatter = plan.makeFormatter({
    id: newCompletionId(plan.kind),
    model: plan.model,
    created: Math.floor(Date.now() / 1000),
    numChoices,
    logprobs: plan.logprobs,
    includeUsage: plan.includeUsage,
  });
  if (plan.stream) return sseResponse(first, events, formatter, plan.includeUsage, headers, ac);
  return collect(first, events, formatter, headers);
}

/** Skips `start` events (reporting them) up to the first event that commits the response. */
async function nextCommitting(
  events: AsyncIterator<JobEvent>,
  onStart: (ev: Extract<JobEvent, { type: "start" }>) => void,
): Promise<Exclude<JobEvent, { type: "start" }>> {
  for (;;) {
    const r = await events.next();
    if (r.done) throw new Error("the job ended without an end or error event");
    if (r.value.type === "start") onStart(r.value);
    else return r.value;
  }
}

export function errorFromInfo(info: ApiErrorInfo, headers?: HeadersInit): ApiError {
  return new ApiError(info, headers);
}

async function collect(
  first: JobEvent,
  events: AsyncIterator<JobEvent>,
  f: ResponseFormatter,
  headers: Record<string, string>,
): Promise<Response> {
  let ev: JobEvent = first;
  for (;;) {
    switch (ev.type) {
      case "delta":
        f.deltaChunk(ev);
        break;
      case "final":
        f.finalChunk(ev);
        break;
      case "error":
        await events.return?.();
        throw errorFromInfo(ev.error, headers);
      case "end":
        await events.return?.(); // lets the runner finish (and release what it holds)
        return Response.json(f.response(ev.usage), { headers });
    }
    const r = await events.next();
    if (r.done) throw errors.internal();
    ev = r.value;
  }
}

const encoder = new TextEncoder();
const sse = (data: unknown): Uint8Array => encoder.encode(`data: ${JSON.stringify(data)}\n\n`);
const DONE = encoder.encode("data: [DONE]\n\n");

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.byteLength;
  }
  return out;
}

function sseResponse(
  first: JobEvent,
  events: AsyncIterator<JobEvent>,
  f: ResponseFormatter,
  includeUsage: boolean,
  headers: Record<string, string>,
  ac: AbortController,
): Response {
  let pending: JobEvent | undefined = first;
  // The opening chunks go out with the first token, in one write: nothing is gained by sending them apart.
  let opening: Uint8Array | undefined = concat(f.openingChunks().map(sse));
  let closed = false;
  const stream = new ReadableStream<Uint8Array>({
    // Pull-based: the next event is read only when the client has taken the previous chunk.
    async pull(controller) {
      const send = (bytes: Uint8Array) => {
        if (closed) return;
        if (opening) {
          bytes = concat([opening, bytes]);
          opening = undefined;
        }
        controller.enqueue(bytes);
      };
      const end = () => {
        if (closed) return;
        closed = true;
        controller.close();
        events.return?.()?.catch(() => {}); // lets the runner finish (and release what it holds)
      };
      for (;;) {
        let ev: JobEvent;
        if (pending) {
          ev = pending;
          pending = undefined;
        } else {
          let r: IteratorResult<JobEvent>;
          try {
            r = await events.next();
          } catch (e) {
            if (!ac.signal.aborted) console.error("job stream failed", e);
            r = { done: true, value: undefined };
          }
          if (closed) return; // cancelled while waiting
          if (r.done) {
            send(sse(errorBody(errors.internal().info)));
            return end();
          }
          ev = r.value;
        }
        switch (ev.type) {
          case "start":
            continue;
          case "delta": {
            const chunk = f.deltaChunk(ev);
            if (!chunk) continue;
            return send(sse(chunk));
          }
          case "final":
            return send(sse(f.finalChunk(ev)));
          case "error":
            send(sse(errorBody(ev.error)));
            return end();
          case "end":
            if (includeUsage) send(sse(f.usageChunk(ev.usage satisfies Usage)));
            send(DONE);
            return end();
        }
      }
    },
    cancel(reason) {
      closed = true;
      ac.abort(reason ?? new Error("client cancelled the stream"));
    },
  });
  return new Response(stream, { headers: { ...headers, ...SSE_HEADERS } });
}
