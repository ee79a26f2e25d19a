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
import { CancelledError, encodeMessage, PROTOCOL_VERSION, poolNames } from "@llama-edge/shared";
import { PrefixRouter, prefixKeys, WorkerTable } from "../dispatch/affinity.ts";
import { decodeEvents, type Job, type JobEvent, type JobRunner, type Limiter } from "../dispatch/job.ts";
import { jobStream } from "../dispatch/job-stream.ts";
import { NatsBackend } from "../dispatch/nats-backend.ts";
import { NatsLink } from "../dispatch/nats-link.ts";
import { subRequests } from "../dispatch/run-job.ts";
import { UsageTally } from "../dispatch/usage-tally.ts";
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

  /**
   * Cancels, at the workers, the requests of a job whose shard died mid-stream (the gateway calls this on a fresh
   * instance): the job is not running here, so a cancel goes out for every id it may have sent, and the workers
   * stop generating for nobody.
   */
  async cancelOrphan(job: Job): Promise<void> {
    if (this.#running.has(job.id)) return this.cancel(job.id);
    const { nc } = await this.#link.get(job.id);
    for (const { pool, id } of subRequests(job)) {
      nc.publish(poolNames(pool).cancel, encodeMessage({ v: PROTOCOL_VERSION, id }));
    }
    await nc.flush();
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

/**
 * Chooses a shard per job and runs it there. Should the shard die mid-stream (reset, evicted, redeployed), the
 * job's events stop with an error: this runner then settles with the key what it relayed to the client (the
 * shard's own settlement, had it come first, wins: settling is idempotent), has the workers' requests cancelled,
 * and ends the job with a 502. Tokens delivered are charged and the slots come back at once.
 */
export class ShardedJobRunner implements JobRunner {
  constructor(
    private readonly ns: DurableObjectNamespace<DispatchShard>,
    private readonly numShards: number,
    private readonly limiter: Limiter,
  ) {}

  shardFor(job: Job): string {
    const first = job.prompts[0] ? prefixKeys(job.prompts[0])[0] : undefined;
    const n = first ? Number.parseInt(first.slice(-6), 36) : Math.floor(Math.random() * 2 ** 31);
    return `shard-${n % this.numShards}`;
  }

  /** The shard running `job` is gone: settle what was relayed, cancel at the workers, and say so. */
  async #shardLost(job: Job, relayed: UsageTally): Promise<JobEvent> {
    const usage = { model: job.model, ...relayed.total() };
    const fresh = this.ns.get(this.ns.idFromName(this.shardFor(job)));
    await Promise.all([this.limiter.settle(job.keyHash, job.reservationId, usage), fresh.cancelOrphan(job)]).catch(
      (e: unknown) => console.error(`job ${job.id}: cleaning up after the shard failed`, e),
    );
    return {
      type: "error",
      error: {
        status: 502,
        message: "The gateway lost the connection to the request's workers; try again.",
        type: "server_error",
        param: null,
        code: "bad_gateway",
      },
    };
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
      const relayed = new UsageTally(job);
      let ended = false;
      try {
        for await (const ev of decodeEvents(stream, signal, { cancelOnAbort: false })) {
          if (ev.type === "delta") relayed.delta(ev.index, ev.num_tokens);
          else if (ev.type === "final") relayed.final(ev.index, ev.usage);
          else if (ev.type === "end" || ev.type === "error") ended = true;
          yield ev;
        }
      } catch (e) {
        if (ended || signal.aborted) return;
        console.error(`job ${job.id}: the dispatch shard failed mid-stream`, e);
      }
      if (ended) return;
      yield await this.#shardLost(job, relayed);
    } finally {
      signal.removeEventListener("abort", onAbort);
      if (!signal.aborted) release?.();
    }
  }
}
