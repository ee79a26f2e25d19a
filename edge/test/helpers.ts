/**
 * Test fixtures: the real app over the real key Durable Objects, with a scripted backend standing in for the NATS
 * workers (the e2e tests in test/ at the repo root use real ones).
 *
 * @module
 */

import { env } from "cloudflare:workers";
import {
  CancelledError,
  type DispatchEvent,
  type SubmitOptions,
  type SubmitRequest,
  type ToolCallDelta,
  WorkerError,
} from "@llama-edge/shared";
import { createApp } from "../src/app.ts";
import { type GatewayConfig, parseGatewayConfig } from "../src/config.ts";
import type { SubmitBackend } from "../src/dispatch/job.ts";
import { LocalJobRunner } from "../src/dispatch/job-stream.ts";
import { ShardedJobRunner } from "../src/durable/dispatch-shard.ts";
import { DurableKeyStore } from "../src/durable/durable-key-store.ts";
import { DurableRequestCounters } from "../src/durable/request-counters.ts";
import type { Limits } from "../src/keys/types.ts";
import type { RequestCounterStore } from "../src/metrics/request-counts.ts";

export const ADMIN_SECRET = "test-admin-secret-0123456789";
export const MODEL = "tiny";

export const testConfig: GatewayConfig = parseGatewayConfig({
  pools: {
    small: { max_context: 256, models: [MODEL] },
    large: { max_context: 4096, models: [MODEL] },
    other: { max_context: 1024, models: ["other-model"] },
  },
  request_timeout_ms: 10_000,
  expose_worker_id: true,
  max_body_bytes: 64 * 1024,
});

/** What the scripted worker does with one request. */
export interface Reply {
  /** Text of each delta (one token each). */
  tokens: string[];
  /** Tool-call pieces sent with the delta of the same index. */
  toolCalls?: (ToolCallDelta[] | undefined)[];
  finish?: "stop" | "length" | "tool_calls";
  promptTokens?: number;
  cachedTokens?: number;
  /** Delay before each event, ms. */
  delayMs?: number;
  /** Fail with this worker error after `errorAfter` deltas (0 = before the first). */
  error?: { code: WorkerError["code"]; message: string; errorAfter?: number };
  /** Fail before `start`, as the Dispatcher does (NoWorkersError, QueueTimeoutError...). */
  throwBeforeStart?: Error;
}

export interface Submission {
  pool: string;
  request: SubmitRequest;
  /** Cancelled before it finished. */
  aborted: boolean;
  /** Ran to its end (final event or error). */
  ended: boolean;
  /** Resolves when the request ended (completed, failed or cancelled). */
  done: Promise<void>;
}

const sleep = (ms: number, signal: AbortSignal, id: string) =>
  new Promise<void>((resolve, reject) => {
    if (signal.aborted) return reject(new CancelledError("aborted", id));
    const t = setTimeout(resolve, ms);
    signal.addEventListener(
      "abort",
      () => {
        clearTimeout(t);
        reject(new CancelledError("aborted", id));
      },
      { once: true },
    );
  });

/** A worker pool in a box: answers each request according to `script`, honouring cancellation like the Dispatcher. */
export class ScriptedBackend implements SubmitBackend {
  readonly submissions: Submission[] = [];
  constructor(
    public script: (pool: string, request: SubmitRequest) => Reply = () => ({ tokens: ["Hello", " world", "!"] }),
  ) {}

  submit(pool: string, request: SubmitRequest, options: Required<SubmitOptions>): AsyncIterable<DispatchEvent> {
    let resolveDone!: () => void;
    const sub: Submission = {
      pool,
      request,
      aborted: false,
      ended: false,
      done: new Promise((r) => (resolveDone = r)),
    };
    this.submissions.push(sub);
    options.signal.addEventListener("abort", () => (sub.aborted ||= !sub.ended), { once: true });
    return this.#events(sub, options.signal, resolveDone);
  }

  async *#events(sub: Submission, signal: AbortSignal, done: () => void): AsyncGenerator<DispatchEvent> {
    const { request } = sub;
    const id = request.id;
    const base = { v: 1 as const, id };
    let seq = 0;
    try {
      const r = this.script(sub.pool, request);
      const delay = r.delayMs ?? 0;
      if (r.throwBeforeStart) throw r.throwBeforeStart;
      await sleep(delay, signal, id);
      yield { ...base, seq: seq++, type: "start", worker_id: "w-1", queue_ms: 0 };
      for (let i = 0; i < r.tokens.length; i++) {
        if (r.error && (r.error.errorAfter ?? 0) === i) throw new WorkerError(r.error.code, r.error.message, id);
        await sleep(delay, signal, id);
        const toolCalls = r.toolCalls?.[i];
        yield {
          ...base,
          seq: seq++,
          type: "delta",
          text: r.tokens[i]!,
          token_ids: [100 + i],
          ...(toolCalls ? { tool_calls: toolCalls } : {}),
        };
      }
      if (r.error && (r.error.errorAfter ?? 0) >= r.tokens.length)
        throw new WorkerError(r.error.code, r.error.message, id);
      await sleep(delay, signal, id);
      yield {
        ...base,
        seq: seq++,
        type: "final",
        finish_reason: r.finish ?? "stop",
        usage: {
          prompt_tokens: r.promptTokens ?? 7,
          completion_tokens: r.tokens.length,
          cached_tokens: r.cachedTokens ?? 0,
        },
      };
      sub.ended = true;
    } catch (e) {
      if (!(e instanceof CancelledError)) sub.ended = true;
      throw e;
    } finally {
      done();
    }
  }
}

export function keyStore(): DurableKeyStore {
  return new DurableKeyStore(env.KEYS, env.KEY_DIRECTORY);
}

/**
 * A Durable Object namespace forwarding to the real `ns` that counts the stubs taken, and makes the stubs'
 * method `fail` (if given) reject: fault injection in front of real objects.
 */
export function instrumented<T extends Rpc.DurableObjectBranded>(ns: DurableObjectNamespace<T>, fail?: string) {
  const counter = { gets: 0 };
  const wrapped = {
    idFromName: (name: string) => ns.idFromName(name),
    get: (id: DurableObjectId) => {
      counter.gets++;
      const stub = ns.get(id);
      if (fail === undefined) return stub;
      return new Proxy(stub, {
        get: (target, prop) =>
          prop === fail ? () => Promise.reject(new Error(`injected ${fail} failure`)) : Reflect.get(target, prop),
      });
    },
  };
  return { ns: wrapped as unknown as DurableObjectNamespace<T>, counter };
}

/**
 * The app over the real key Durable Objects, running jobs in this isolate on `backend`. `opts.keys` replaces the
 * key store (fault injection); `opts.adminSecret` the admin secret (undefined: none); `opts.requestCounters` where
 * request counts go (default: the shared request counter objects).
 */
export function makeApp(
  backend = new ScriptedBackend(),
  config = testConfig,
  opts: { keys?: DurableKeyStore; adminSecret?: string; requestCounters?: RequestCounterStore } = {},
) {
  const keys = opts.keys ?? keyStore();
  const app = createApp({
    keyStore: keys,
    limiter: keys,
    dispatcher: new LocalJobRunner({ backend, limiter: keys }),
    config,
    requestCounters: opts.requestCounters ?? new DurableRequestCounters(env.REQUEST_COUNTERS),
    adminSecret: "adminSecret" in opts ? opts.adminSecret : ADMIN_SECRET,
  });
  return { app, keys, backend };
}

/** The app as the Workers entry builds it: jobs run in dispatch shard Durable Objects over the real NATS. */
export function shardedApp(config = parseGatewayConfig(env.GATEWAY_CONFIG), numShards = 2) {
  const keys = keyStore();
  const app = createApp({
    keyStore: keys,
    limiter: keys,
    dispatcher: new ShardedJobRunner(env.DISPATCH, numShards, keys),
    config,
    requestCounters: new DurableRequestCounters(env.REQUEST_COUNTERS),
  });
  return { app, keys };
}

export async function newKey(limits: Partial<Limits> = {}): Promise<{ key: string; id: string; hash: string }> {
  const { key, info } = await keyStore().create({ limits });
  const { hashApiKey } = await import("../src/keys/api-key.ts");
  return { key, id: info.id, hash: await hashApiKey(key) };
}

export const bearer = (key: string) => ({ authorization: `Bearer ${key}` });

/** A minimal chat completions body for MODEL, with `extra` fields. */
export const chat = (extra: Record<string, unknown> = {}) => ({
  model: MODEL,
  messages: [{ role: "user", content: "Hi" }],
  ...extra,
});

export function post(path: string, key: string | undefined, body: unknown, headers: Record<string, string> = {}) {
  return new Request(`http://gateway${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(key ? bearer(key) : {}), ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

/** Parses an SSE body into its `data:` payloads (JSON, or the literal "[DONE]"). */
export async function sseEvents(res: Response): Promise<unknown[]> {
  const text = await res.text();
  return text
    .split("\n\n")
    .filter((block) => block.trim() !== "")
    .map((block) => {
      if (!block.startsWith("data: ")) throw new Error(`not an SSE data block: ${JSON.stringify(block)}`);
      const data = block.slice(6);
      return data === "[DONE]" ? data : JSON.parse(data);
    });
}

export async function openReservations(hash: string): Promise<number> {
  const stub = env.KEYS.get(env.KEYS.idFromName(hash));
  return (await stub.openReservations()) as number;
}

/** Polls until `f` returns true (or throws after `ms`). */
export async function eventually(f: () => Promise<boolean> | boolean, ms = 3000): Promise<void> {
  const until = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > until) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 10));
  }
}
