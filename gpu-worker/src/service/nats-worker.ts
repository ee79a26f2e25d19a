/**
 * The worker side of the dispatch protocol (see shared/src/protocol.ts): pulls requests from its pool's
 * JetStream consumer when the engine has room, streams their events to the requester, answers cancels,
 * publishes load reports, and drains on shutdown.
 *
 * NOTE on acknowledgement. A pulled request stays ack-pending for as long as it runs (we signal in-progress every
 * ack_wait/3) and is acked when it ends. So the consumer's NumPending + NumAckPending, which KEDA's
 * nats-jetstream scaler reads as lag, counts requests queued *and* running: a busy pool is not scaled down
 * while its queue happens to be empty. Set KEDA's lagThreshold to the workers' max_num_seqs.
 * The price is that JetStream redelivers a request whose worker died, after tokens may have gone out. A worker
 * therefore runs a *redelivered* request only after the requester grants it a claim, which it does only if it has
 * seen no `start` (the first worker died before admission). Otherwise the requester has already reported the
 * silence as an error, and the request is dropped: never a second run that duplicates text.
 * Requests refused before admission (malformed, past deadline, wrong model) are termed: never redelivered.
 *
 * @module
 */
import { randomBytes } from "node:crypto";
import {
  type ClaimMessage,
  type DirectReply,
  directSubject,
  encodeMessage,
  HEARTBEAT_INTERVAL_MS,
  LOAD_REPORT_INTERVAL_MS,
  type LoadReport,
  type ParseFailure,
  type PoolNames,
  PROTOCOL_VERSION,
  parseCancelMessage,
  parseClaimReply,
  parseRequestMessage,
  poolNames,
  type RequestMessage,
  type TokenEvent,
} from "@llama-edge/shared";
import {
  type Consumer,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream";
import type { ConnectionOptions, Msg, NatsConnection } from "@nats-io/nats-core";
import { connect } from "@nats-io/transport-node";
import type { Logger } from "pino";
import type { ServedEvent } from "../chat/output-plan.ts";
import { type EngineHost, EngineRequestFailed } from "./engine-host.ts";
import type { PoolLag, RequestOutcome, WorkerMetrics } from "./metrics.ts";
import { ensurePool, type PoolSetupOptions } from "./pool-setup.ts";
import { toHostRequest, toWireLogprob, toWireUsage } from "./wire-mapping.ts";

export interface NatsWorkerOptions {
  /** NATS server URL(s). */
  servers: string | string[];
  /** Credentials and other connection settings (user/pass, token, authenticator, tls). */
  connectionOptions?: Omit<ConnectionOptions, "servers" | "name">;
  pool: string;
  workerId: string;
  engine: EngineHost;
  logger: Logger;
  metrics?: WorkerMetrics;
  /** Model names requests may ask for. Default: the engine's model name. */
  servedModelNames?: string[];
  /** Pull only while at least this fraction of the KV blocks is free. Default 0.05. */
  kvFreeWatermark?: number;
  /** Most requests admitted at once. Default: the engine's max_num_seqs. */
  maxNumSeqs?: number;
  heartbeatIntervalMs?: number;
  loadReportIntervalMs?: number;
  /** Lifetime of one pull request; also the longest a drain waits for an outstanding pull. Default 2000. */
  pullExpiresMs?: number;
  /** How long to wait for the requester to answer a claim on a redelivered request. Default 2000. */
  claimTimeoutMs?: number;
  poolSetup?: PoolSetupOptions;
  /** Gives up connecting (start() resolves to null) once aborted. */
  signal?: AbortSignal;
}

/** One admitted request. */
interface InFlight {
  req: RequestMessage;
  /** The JetStream message, acked when the request ends; null for an addressed (direct) request. */
  msg: JsMsg | null;
  log: Logger;
  /** Next event's sequence number. */
  seq: number;
  admittedAt: number;
  lastEventAt: number;
  lastProgressAt: number;
  firstTokenAt?: number;
  lastTokenAt?: number;
  /** Aborted because the drain grace period ran out: reported as `unavailable`, not as a normal abort. */
  abortedByShutdown: boolean;
  /** Generated tokens sent so far (logged with a cancel: what the engine makes after it is at most one step). */
  numTokensSent: number;
}

/** An event as the worker composes it; `#emit` adds the version, request id and sequence number. */
type EventBody = DistributiveOmit<TokenEvent, "v" | "id" | "seq">;
type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

const JS_API_TIMEOUT_MS = 2000;

/** Cancels seen for requests not running here, kept this long in case the request is pulled afterwards. */
const CANCEL_MEMORY_MS = 10 * 60_000;
const CANCEL_MEMORY_MAX = 10_000;

export class NatsWorker {
  readonly nc: NatsConnection;
  readonly #js: JetStreamClient;
  readonly #o: Required<
    Omit<NatsWorkerOptions, "metrics" | "poolSetup" | "servers" | "signal" | "connectionOptions">
  > & {
    metrics?: WorkerMetrics;
  };
  readonly #names: PoolNames;
  /** This process's subject for addressed requests (a random token: worker ids may hold characters subjects can't). */
  readonly #directSubject: string;
  readonly #served: Set<string>;
  readonly #ackWaitMs: number;
  readonly #poolSetup: PoolSetupOptions | undefined;
  readonly #inFlight = new Map<string, InFlight>();
  readonly #cancelled = new Map<string, number>();
  readonly #timers: ReturnType<typeof setInterval>[] = [];
  #connected = true;
  #draining = false;
  #wakeRoomWaiter: (() => void) | undefined;
  #pullLoop: Promise<void> = Promise.resolve();
  #drained: Promise<void> | undefined;
  #jsm: Promise<JetStreamManager> | undefined;

  private constructor(nc: NatsConnection, opts: NatsWorkerOptions, ackWaitMs: number) {
    this.nc = nc;
    // Short API timeout: a lookup sent while JetStream restarts must not hold up pulling for the default 5 s.
    this.#js = jetstream(nc, { timeout: JS_API_TIMEOUT_MS });
    this.#poolSetup = opts.poolSetup;
    this.#names = poolNames(opts.pool);
    this.#directSubject = directSubject(opts.pool, randomBytes(8).toString("hex"));
    this.#ackWaitMs = ackWaitMs;
    this.#o = {
      pool: opts.pool,
      workerId: opts.workerId,
      engine: opts.engine,
      logger: opts.logger,
      metrics: opts.metrics,
      servedModelNames: opts.servedModelNames ?? [opts.engine.config.modelName],
      kvFreeWatermark: opts.kvFreeWatermark ?? 0.05,
      maxNumSeqs: opts.maxNumSeqs ?? opts.engine.config.maxNumSeqs,
      heartbeatIntervalMs: opts.heartbeatIntervalMs ?? HEARTBEAT_INTERVAL_MS,
      loadReportIntervalMs: opts.loadReportIntervalMs ?? LOAD_REPORT_INTERVAL_MS,
      pullExpiresMs: opts.pullExpiresMs ?? 2000,
      claimTimeoutMs: opts.claimTimeoutMs ?? 2000,
    };
    this.#served = new Set(this.#o.servedModelNames);
  }

  /**
   * Connects (retrying until NATS is reachable or `signal` aborts, then resolving to null), creates the pool's
   * stream and consumer if absent, and starts pulling.
   */
  static async start(opts: NatsWorkerOptions): Promise<NatsWorker | null> {
    const nc = await connectWithRetry(opts);
    if (!nc) return null;
    try {
      const setup = await ensurePool(await jetstreamManager(nc), opts.pool, opts.poolSetup);
      opts.logger.info({ ...setup, pool: opts.pool }, "pool stream and consumer ready");
      const worker = new NatsWorker(nc, opts, setup.ackWaitMs);
      worker.#begin();
      return worker;
    } catch (e) {
      await nc.close();
      throw e;
    }
  }

  get connected(): boolean {
    return this.#connected && !this.nc.isClosed();
  }

  get draining(): boolean {
    return this.#draining;
  }

  /** The pool consumer's counts (what KEDA reads as lag), for /metrics. */
  async poolLag(): Promise<PoolLag> {
    this.#jsm ??= jetstreamManager(this.nc, { timeout: JS_API_TIMEOUT_MS, checkAPI: false });
    try {
      const info = await (await this.#jsm).consumers.info(this.#names.stream, this.#names.consumer);
      return { pending: info.num_pending, ackPending: info.num_ack_pending };
    } catch (e) {
      this.#jsm = undefined;
      throw e;
    }
  }

  get numInFlight(): number {
    return this.#inFlight.size;
  }

  #begin(): void {
    const { metrics, engine, logger } = this.#o;
    metrics?.natsConnected.set(1);
    void this.#watchStatus();
    // Addressed requests (prefix affinity): the gateway offers a request to this worker when it caches the prompt's
    // prefix. Accepted only when a pull would be taken now, then run exactly as a pulled one.
    this.nc.subscribe(this.#directSubject, {
      callback: (err, msg) => {
        if (!err) this.#onDirect(msg);
      },
    });
    this.nc.subscribe(this.#names.cancel, {
      callback: (err, msg) => {
        if (!err) this.#onCancel(msg.data);
      },
    });
    engine.onStats(() => this.#wakeRoomWaiter?.());
    this.#timers.push(setInterval(() => this.#tick(), Math.min(250, this.#o.heartbeatIntervalMs / 2)));
    this.#timers.push(setInterval(() => void this.#publishLoad(), this.#o.loadReportIntervalMs));
    void this.#publishLoad();
    this.#pullLoop = this.#pull().catch((e) => logger.error({ err: e }, "pull loop failed"));
  }

  async #watchStatus(): Promise<void> {
    const { logger, metrics } = this.#o;
    for await (const s of this.nc.status()) {
      if (s.type === "disconnect") {
        this.#connected = false;
        metrics?.natsConnected.set(0);
        logger.warn({ server: s.server }, "NATS disconnected");
      } else if (s.type === "reconnect") {
        this.#connected = true;
        this.#wakeRoomWaiter?.();
        metrics?.natsConnected.set(1);
        logger.info({ server: s.server }, "NATS reconnected");
      } else if (s.type === "error") {
        logger.warn({ err: s.error }, "NATS error");
      }
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Pulling and admission

  #hasRoom(): boolean {
    const s = this.#o.engine.stats();
    const freeNeeded = Math.max(1, Math.ceil(this.#o.kvFreeWatermark * s.kvBlocksTotal));
    return this.#inFlight.size < this.#o.maxNumSeqs && s.kvBlocksFree >= freeNeeded;
  }

  /** One message at a time, and only when the engine could start it now: the queue is the admission control. */
  async #pull(): Promise<void> {
    const { logger } = this.#o;
    let consumer: Consumer | undefined;
    let backoffMs = 100;
    while (!this.#draining) {
      if (!this.#hasRoom()) {
        await this.#sleep(500);
        continue;
      }
      let msg: JsMsg | null;
      try {
        consumer ??= await this.#js.consumers.get(this.#names.stream, this.#names.consumer);
        msg = await consumer.next({ expires: this.#o.pullExpiresMs });
        backoffMs = 100;
      } catch (e) {
        if (this.nc.isClosed()) return;
        logger.warn({ err: e }, "pull failed; retrying");
        if (isMissingResource(e)) {
          // Deleted (or a JetStream store lost): recreate it as at start, where our permissions allow.
          consumer = undefined;
          await this.#recreatePool();
        }
        // Woken early by a reconnect: the next pull goes out as soon as the connection is back.
        await this.#sleep(backoffMs);
        backoffMs = Math.min(backoffMs * 2, 1000);
        continue;
      }
      if (!msg) continue;
      if (this.#draining) {
        msg.nak(); // pulled while the drain began: straight back to the queue for another worker
        break;
      }
      await this.#admit(msg);
    }
  }

  /** Waits `ms`, or less if room frees up, the connection comes back or the drain begins. */
  async #sleep(ms: number): Promise<void> {
    await new Promise<void>((resolve) => {
      this.#wakeRoomWaiter = resolve;
      setTimeout(resolve, ms);
    });
    this.#wakeRoomWaiter = undefined;
  }

  async #recreatePool(): Promise<void> {
    try {
      await ensurePool(await jetstreamManager(this.nc, { timeout: JS_API_TIMEOUT_MS }), this.#o.pool, this.#poolSetup);
    } catch (e) {
      this.#o.logger.warn({ err: e }, "could not recreate the pool's stream and consumer");
    }
  }

  #onDirect(msg: Msg): void {
    const parsed = parseRequestMessage(msg.data);
    const req = parsed.ok ? parsed.value : null;
    const accepted =
      req !== null &&
      !this.#draining &&
      this.#hasRoom() &&
      this.#served.has(req.model) &&
      Date.now() <= req.deadline &&
      !this.#cancelled.has(req.id) &&
      !this.#inFlight.has(req.id);
    const reply: DirectReply = { v: PROTOCOL_VERSION, id: req?.id ?? "invalid", accepted };
    // Refusals cost the gateway nothing: it queues the request under another id (malformed ones get their error
    // from the queue path).
    msg.respond(new TextEncoder().encode(JSON.stringify(reply)));
    if (accepted && req) this.#start(req, null);
  }

  async #admit(msg: JsMsg): Promise<void> {
    const parsed = parseRequestMessage(msg.data);
    if (!parsed.ok) return this.#reject(msg, parsed);
    const req = parsed.value;
    const fail = (code: ParseFailure["code"], message: string) =>
      this.#reject(msg, { ok: false, code, message, id: req.id, replyTo: req.reply_to });
    if (!this.#served.has(req.model)) {
      return fail("model_not_found", `pool ${this.#o.pool} serves ${[...this.#served].join(", ")}, not ${req.model}`);
    }
    if (Date.now() > req.deadline) return fail("deadline_exceeded", "the deadline passed while the request was queued");
    if (this.#cancelled.has(req.id)) {
      msg.term();
      this.#o.logger.info({ request_id: req.id }, "request cancelled while queued: dropped");
      return;
    }
    if (this.#inFlight.has(req.id)) {
      msg.term(); // our own earlier delivery is still streaming it
      return;
    }
    if (msg.info.deliveryCount > 1 && !(await this.#claim(req))) {
      msg.term();
      this.#o.logger.warn({ request_id: req.id, deliveries: msg.info.deliveryCount }, "claim refused: dropped");
      return;
    }
    this.#start(req, msg);
  }

  /** See the NOTE at the top: only the requester knows whether a redelivered request already started. */
  async #claim(req: RequestMessage): Promise<boolean> {
    const claim: ClaimMessage = { v: PROTOCOL_VERSION, type: "claim", id: req.id, worker_id: this.#o.workerId };
    try {
      const reply = await this.nc.request(req.reply_to, encodeMessage(claim), { timeout: this.#o.claimTimeoutMs });
      const parsed = parseClaimReply(reply.data);
      return parsed.ok && parsed.value.id === req.id && parsed.value.granted;
    } catch {
      return false; // nobody listening: the requester gave up
    }
  }

  #reject(msg: JsMsg, failure: ParseFailure): void {
    msg.term();
    this.#o.metrics?.requests.inc({ outcome: "rejected" });
    this.#o.logger.warn({ request_id: failure.id, code: failure.code, reason: failure.message }, "request rejected");
    if (failure.id === undefined || failure.replyTo === undefined) return;
    const ev: TokenEvent = {
      v: PROTOCOL_VERSION,
      id: failure.id,
      seq: 0,
      type: "error",
      code: failure.code,
      message: failure.message,
    };
    this.#publish(failure.replyTo, ev);
  }

  #start(req: RequestMessage, msg: JsMsg | null): void {
    const now = Date.now();
    const f: InFlight = {
      req,
      msg,
      log: this.#o.logger.child({ request_id: req.id }),
      seq: 0,
      admittedAt: now,
      lastEventAt: now,
      lastProgressAt: now,
      abortedByShutdown: false,
      numTokensSent: 0,
    };
    this.#inFlight.set(req.id, f);
    const queueMs = req.submitted_at === undefined ? 0 : Math.max(0, now - req.submitted_at);
    this.#o.metrics?.inFlight.set(this.#inFlight.size);
    this.#o.metrics?.queueTimeSeconds.observe(queueMs / 1000);
    f.log.info(
      { queue_ms: queueMs, deliveries: msg?.info.deliveryCount ?? 0, direct: msg === null, prompt: req.prompt.type },
      "admitted",
    );
    this.#emit(f, { type: "start", worker_id: this.#o.workerId, queue_ms: queueMs });
    let events: AsyncIterable<ServedEvent>;
    try {
      events = this.#o.engine.submit(toHostRequest(req));
    } catch (e) {
      void this.#finish(f, e);
      return;
    }
    void this.#stream(f, events);
  }

  async #stream(f: InFlight, events: AsyncIterable<ServedEvent>): Promise<void> {
    try {
      for await (const ev of events) {
        if (ev.type === "delta") {
          const now = Date.now();
          if (f.firstTokenAt === undefined) {
            f.firstTokenAt = now;
            this.#o.metrics?.timeToFirstTokenSeconds.observe((now - f.admittedAt) / 1000);
          } else if (ev.tokenIds.length > 0) {
            // A delta may carry several tokens (the detokenizer waits for whole characters): one gap each.
            const gap = (now - (f.lastTokenAt ?? now)) / 1000 / ev.tokenIds.length;
            for (let i = 0; i < ev.tokenIds.length; i++) this.#o.metrics?.interTokenLatencySeconds.observe(gap);
          }
          f.lastTokenAt = now;
          f.numTokensSent += ev.tokenIds.length;
          this.#emit(f, {
            type: "delta",
            text: ev.text,
            token_ids: ev.tokenIds,
            ...(ev.logprobs ? { logprobs: ev.logprobs.map(toWireLogprob) } : {}),
            ...(ev.toolCalls ? { tool_calls: ev.toolCalls } : {}),
          });
        } else {
          await this.#finish(f, ev);
          return;
        }
      }
      await this.#finish(f, new Error("engine stream ended without a final event"));
    } catch (e) {
      await this.#finish(f, e);
    }
  }

  /** Sends the last event, acks the message (the request leaves the queue), and frees the slot. */
  async #finish(f: InFlight, end: Extract<ServedEvent, { type: "final" }> | unknown): Promise<void> {
    const { metrics } = this.#o;
    let outcome: RequestOutcome;
    if (isFinal(end)) {
      const usage = toWireUsage(end.usage);
      if (f.abortedByShutdown) {
        outcome = "failed";
        this.#emit(f, { type: "error", code: "unavailable", message: "the worker shut down before finishing" });
      } else {
        outcome = end.finishReason === "abort" ? "aborted" : "completed";
        this.#emit(f, { type: "final", finish_reason: end.finishReason, usage });
      }
      metrics?.promptTokens.inc(usage.prompt_tokens);
      metrics?.cachedPromptTokens.inc(usage.cached_tokens);
      metrics?.generationTokens.inc(usage.completion_tokens);
      metrics?.e2eRequestLatencySeconds.observe((Date.now() - f.admittedAt) / 1000);
      f.log.info({ finish_reason: end.finishReason, usage, ms: Date.now() - f.admittedAt }, "finished");
    } else {
      const badRequest = end instanceof EngineRequestFailed && BAD_REQUEST_ERRORS.has(end.error.name);
      outcome = badRequest ? "rejected" : "failed";
      const message = end instanceof Error ? end.message : String(end);
      const engineCode = end instanceof EngineRequestFailed ? end.error.code : undefined;
      // A failed engine step is retriable (unavailable); one sequence's own failure is internal.
      const code = !badRequest
        ? engineCode === "unavailable"
          ? "unavailable"
          : "internal"
        : engineCode === "context_length_exceeded"
          ? "context_length_exceeded"
          : "bad_request";
      const param = end instanceof EngineRequestFailed ? end.error.param : undefined;
      this.#emit(f, { type: "error", code, message, ...(param ? { param } : {}) });
      if (badRequest) f.log.warn({ reason: message }, "engine refused the request");
      else f.log.error({ err: end }, "request failed");
    }
    this.#inFlight.delete(f.req.id);
    f.msg?.ack();
    metrics?.requests.inc({ outcome });
    metrics?.inFlight.set(this.#inFlight.size);
    this.#wakeRoomWaiter?.();
  }

  #emit(f: InFlight, body: EventBody): void {
    const ev = { v: PROTOCOL_VERSION, id: f.req.id, seq: f.seq++, ...body } as TokenEvent;
    f.lastEventAt = Date.now();
    this.#publish(f.req.reply_to, ev);
  }

  #publish(subject: string, ev: TokenEvent): void {
    try {
      this.nc.publish(subject, encodeMessage(ev));
    } catch (e) {
      // Only a closed connection throws (while reconnecting, publishes are buffered).
      this.#o.logger.warn({ err: e, request_id: ev.id }, "could not publish event");
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Cancels, heartbeats, load reports

  #onCancel(data: Uint8Array): void {
    const parsed = parseCancelMessage(data);
    if (!parsed.ok) return;
    const { id } = parsed.value;
    const f = this.#inFlight.get(id);
    if (f) {
      f.log.info({ completion_tokens_sent: f.numTokensSent }, "cancelled by the requester");
      this.#o.engine.abort(id);
      return;
    }
    // Not running here: it may still be queued (or pulled by us in a moment), so remember it for a while.
    this.#cancelled.delete(id); // re-inserted at the end: the map stays in expiry order
    if (this.#cancelled.size >= CANCEL_MEMORY_MAX) this.#cancelled.delete(this.#cancelled.keys().next().value!);
    this.#cancelled.set(id, Date.now() + CANCEL_MEMORY_MS);
  }

  #tick(): void {
    const now = Date.now();
    for (const f of this.#inFlight.values()) {
      // Until its first token (queued in the engine, long prefill) nothing else shows the requester we are alive.
      if (now - f.lastEventAt >= this.#o.heartbeatIntervalMs) this.#emit(f, { type: "heartbeat" });
      if (now - f.lastProgressAt >= this.#ackWaitMs / 3) {
        f.lastProgressAt = now;
        f.msg?.working(); // keeps JetStream from redelivering a request that is running fine
      }
    }
    for (const [id, until] of this.#cancelled) {
      if (until > now) break; // insertion order = expiry order
      this.#cancelled.delete(id);
    }
  }

  async #publishLoad(): Promise<void> {
    const { engine } = this.#o;
    const s = engine.stats();
    const report: LoadReport = {
      v: PROTOCOL_VERSION,
      worker_id: this.#o.workerId,
      pool: this.#o.pool,
      model: engine.config.modelName,
      ts: Date.now(),
      running: s.running,
      waiting: s.waiting,
      max_num_seqs: this.#o.maxNumSeqs,
      kv_blocks_total: s.kvBlocksTotal,
      kv_blocks_free: s.kvBlocksFree,
      kv_usage: s.kvBlocksTotal > 0 ? Math.min(1, s.kvBlocksUsed / s.kvBlocksTotal) : 0,
      prefix_cache: {
        block_size: s.blockSize,
        hit_rate: s.prefixCacheHitRate,
        block_hashes: await engine.prefixBlockHashes(256),
      },
      tokens_per_second: s.tokensPerSecond,
      draining: this.#draining,
      direct_subject: this.#directSubject,
    };
    if (this.nc.isClosed()) return;
    try {
      this.nc.publish(this.#names.load, encodeMessage(report));
    } catch {
      // closing
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Shutdown

  /**
   * Stops pulling, lets the requests in flight finish for up to `graceMs`, aborts the rest (their requesters get
   * an `unavailable` error), then drains and closes the NATS connection. Safe to call more than once.
   */
  drain(graceMs: number): Promise<void> {
    this.#drained ??= this.#drain(graceMs);
    return this.#drained;
  }

  async #drain(graceMs: number): Promise<void> {
    const { logger, engine, metrics } = this.#o;
    this.#draining = true;
    metrics?.draining.set(1);
    this.#wakeRoomWaiter?.();
    logger.info({ in_flight: this.#inFlight.size, grace_ms: graceMs }, "draining: no new requests");
    void this.#publishLoad();
    await this.#pullLoop;
    const until = Date.now() + graceMs;
    while (this.#inFlight.size > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    if (this.#inFlight.size > 0) {
      logger.warn({ in_flight: this.#inFlight.size }, "grace period over: aborting the requests in flight");
      for (const f of this.#inFlight.values()) {
        f.abortedByShutdown = true;
        engine.abort(f.req.id);
      }
      const abortUntil = Date.now() + 2000;
      while (this.#inFlight.size > 0 && Date.now() < abortUntil) await new Promise((r) => setTimeout(r, 20));
    }
    for (const t of this.#timers) clearInterval(t);
    await this.nc.drain().catch(() => this.nc.close());
    logger.info("drained");
  }

  /** Stops at once, without draining (tests, fatal errors). */
  async close(): Promise<void> {
    this.#draining = true;
    this.#wakeRoomWaiter?.();
    for (const t of this.#timers) clearInterval(t);
    await this.nc.close();
  }
}

async function connectWithRetry(opts: NatsWorkerOptions): Promise<NatsConnection | null> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await connect({
        ...opts.connectionOptions,
        servers: opts.servers,
        name: `llama-worker ${opts.workerId}`,
        // Forever: a worker without NATS is useless, and a restart would not bring NATS back sooner.
        maxReconnectAttempts: -1,
        reconnectTimeWait: 250,
        pingInterval: 10_000,
      });
    } catch (e) {
      if (opts.signal?.aborted) return null;
      if (attempt === 1 || attempt % 30 === 0) opts.logger.warn({ err: e, attempt }, "cannot reach NATS; retrying");
      await new Promise((r) => setTimeout(r, 1000));
      if (opts.signal?.aborted) return null;
    }
  }
}

function isMissingResource(e: unknown): boolean {
  const { name, message } = e as Error;
  return /NotFound/.test(name) || /not found|deleted/i.test(message ?? "");
}

/** Engine refusals that are the request's fault (names as the engine thread reports them). */
const BAD_REQUEST_ERRORS = new Set([
  "EngineRequestError",
  "SamplingParamError",
  "ChatTemplateError",
  "GrammarError",
  "OutputRequestError",
]);

function isFinal(x: unknown): x is Extract<ServedEvent, { type: "final" }> {
  return typeof x === "object" && x !== null && (x as { type?: unknown }).type === "final";
}
