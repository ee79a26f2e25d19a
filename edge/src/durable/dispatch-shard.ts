/**
 * Dispatch shards: Durable Objects that hold the gateway's NATS connection and run jobs.
 *
 * NOTE on the design. In workerd an I/O object belongs to the request that created it: a NATS WebSocket opened
 * while serving one request cannot be used from another ("Cannot perform I/O on behalf of a different request";
 * nats-core surfaces it as a 2 s request timeout or a hung flush). Connecting per request would cost a WebSocket
 * and NATS handshake on every call. A Durable Object's I/O, in contrast, belongs to the object, so its connection
 * serves every request routed to it (~3-4 ms per NATS request/reply measured), and a ReadableStream returned from
 * its RPC method reaches the client incrementally. So each shard owns one connection, subscribes to every pool's
 * load reports (its view of the workers), and runs the jobs sent to it: submission, event merging, and settlement
 * with the key's Durable Object when the workers' final events arrive, independent of the client.
 *
 * Requests are spread over `DISPATCH_SHARDS` shards by the first prefix key of their prompt (a chat's first
 * message, typically the system prompt): requests sharing a prefix meet in the same shard, whose learned
 * affinity table then sends them to the worker that caches it. More shards = more connections and parallelism;
 * a shard is one single-threaded object, but it only moves bytes (~tens of µs per event).
 *
 * @module
 */

import { DurableObject } from "cloudflare:workers";
import { CancelledError } from "@llama-edge/shared";
import { PrefixRouter, prefixKeys, WorkerTable } from "../dispatch/affinity.ts";
import { decodeEvents, type Job, type JobEvent, type JobRunner } from "../dispatch/job.ts";
import { NatsBackend } from "../dispatch/nats-backend.ts";
import { NatsLink } from "../dispatch/nats-link.ts";
import { jobStream } from "../dispatch/run-job.ts";
import { DurableKeyStore } from "./durable-key-store.ts";
import type { KeyDirectory, KeyState } from "./key-state.ts";

/** The bindings a dispatch shard reads (the gateway's Env extends this). */
export interface DispatchShardEnv {
  KEYS: DurableObjectNamespace<KeyState>;
  KEY_DIRECTORY: DurableObjectNamespace<KeyDirectory>;
  /** nats-server WebSocket listener, ws:// or wss://. */
  NATS_URL: string;
  /** Secrets, when the NATS WebSocket listener requires authentication. */
  NATS_TOKEN?: string;
  NATS_USER?: string;
  NATS_PASSWORD?: string;
}

export class DispatchShard extends DurableObject<DispatchShardEnv> {
  readonly #table = new WorkerTable();
  readonly #router = new PrefixRouter(this.#table);
  readonly #link: NatsLink;
  readonly #backend: NatsBackend;
  readonly #keys: DurableKeyStore;
  readonly #running = new Map<string, AbortController>();

  constructor(ctx: DurableObjectState, env: DispatchShardEnv) {
    super(ctx, env);
    this.#link = new NatsLink({
      url: env.NATS_URL,
      token: env.NATS_TOKEN,
      user: env.NATS_USER,
      pass: env.NATS_PASSWORD,
      onLoadReport: (report, directSubject) => this.#table.update(report, directSubject),
    });
    this.#backend = new NatsBackend(this.#link, this.#router);
    this.#keys = new DurableKeyStore(env.KEYS, env.KEY_DIRECTORY);
  }

  /** Runs `job`; its events as NDJSON. Cancelling the stream cancels the job (usage is settled either way). */
  run(job: Job): ReadableStream<Uint8Array> {
    const ac = new AbortController();
    this.#running.set(job.id, ac);
    const deps = {
      backend: this.#backend,
      limiter: this.#keys,
      log: (msg: string, err: unknown) => console.error(msg, err),
    };
    return jobStream(job, deps, ac, () => this.#running.delete(job.id));
  }

  /**
   * Cancels a running job. The gateway calls this when its client disconnects: workerd does not reliably turn a
   * dropped client into a cancel of the RPC stream this object returned (measured under `wrangler dev`), so the
   * cancel travels as its own call.
   */
  cancel(jobId: string): void {
    this.#running.get(jobId)?.abort(new CancelledError("the client disconnected", jobId));
  }

  /** Connects now (start-up and health checks): true if NATS is reachable. */
  async warm(): Promise<boolean> {
    try {
      await this.#link.get();
      return true;
    } catch {
      return false;
    }
  }

  /** The workers this shard sees, for debugging and tests. */
  workers(pool: string): { worker_id: string; running: number; has_room: boolean; direct: boolean }[] {
    return this.#table.inPool(pool).map((w) => ({
      worker_id: w.report.worker_id,
      running: w.report.running,
      has_room: this.#table.hasRoom(w),
      direct: w.directSubject !== undefined,
    }));
  }
}

/** Chooses a shard per job and runs it there. */
export class ShardedJobRunner implements JobRunner {
  constructor(
    private readonly ns: DurableObjectNamespace<DispatchShard>,
    private readonly numShards: number,
  ) {}

  shardFor(job: Job): string {
    const first = job.prompts[0] ? prefixKeys(job.prompts[0])[0] : undefined;
    const n = first ? Number.parseInt(first.slice(-6), 36) : Math.floor(Math.random() * 2 ** 31);
    return `shard-${n % this.numShards}`;
  }

  async *run(job: Job, signal: AbortSignal, waitUntil?: (p: Promise<unknown>) => void): AsyncGenerator<JobEvent> {
    const stub = this.ns.get(this.ns.idFromName(this.shardFor(job)));
    // Registered while the request is alive: after a client disconnect only waitUntil work may still do I/O,
    // and the cancel below must reach the shard.
    let release!: () => void;
    waitUntil?.(new Promise<void>((r) => (release = r)));
    const onAbort = () => {
      stub.cancel(job.id).then(release, (e: unknown) => {
        console.error(`cancelling ${job.id} failed`, e);
        release?.();
      });
    };
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      if (signal.aborted) throw new CancelledError("the client disconnected before dispatch", job.id);
      const stream = (await stub.run(job)) as ReadableStream<Uint8Array>;
      if (signal.aborted) onAbort(); // the first cancel may have reached the shard before the job did
      yield* decodeEvents(stream, signal, { cancelOnAbort: false });
    } finally {
      signal.removeEventListener("abort", onAbort);
      if (!signal.aborted) release?.();
    }
  }
}
