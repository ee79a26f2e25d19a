/**
 * A NATS worker in the test process (inside workerd, over WebSocket): speaks the dispatch protocol like
 * gpu-worker's NatsWorker (pulls from the pool's JetStream consumer, streams events, honours cancels, publishes
 * load reports) and addressed requests (PoolNames.direct).
 * Its "prefix cache" remembers the first message (or 16 characters) of every prompt it ran: a later prompt with
 * the same one reports cached_tokens, so affinity shows up in usage as it would on a real engine.
 */
import {
  encodeMessage,
  type LoadReport,
  PROTOCOL_VERSION,
  parseCancelMessage,
  parseRequestMessage,
  poolNames,
  type RequestMessage,
  type TokenEvent,
} from "@llama-edge/shared";
import { AckPolicy, jetstream, jetstreamManager, RetentionPolicy } from "@nats-io/jetstream";
import { type NatsConnection, wsconnect } from "@nats-io/nats-core";

export interface FakeWorkerOptions {
  url: string;
  pool: string;
  workerId: string;
  model: string;
  /** Take addressed requests (and advertise direct_subject). Default true. */
  direct?: boolean;
  /** Answer addressed requests with accepted=false. */
  refuseDirect?: boolean;
  /** Tokens to emit for a request. */
  tokens?: (req: RequestMessage) => string[];
  delayMs?: number;
  /** Pull from the queue. Default true. */
  pull?: boolean;
}

export const CACHED_TOKENS = 8;

export class FakeWorker {
  readonly received: { id: string; via: "queue" | "direct" }[] = [];
  readonly cancelled = new Set<string>();
  readonly #prefixes = new Set<string>();
  #stopped = false;
  #timer: ReturnType<typeof setInterval> | undefined;

  private constructor(
    readonly nc: NatsConnection,
    readonly o: FakeWorkerOptions,
  ) {}

  get directSubject(): string {
    return `llama.pool.${this.o.pool}.worker.${this.o.workerId}`;
  }

  static async start(o: FakeWorkerOptions): Promise<FakeWorker> {
    const nc = await wsconnect({ servers: o.url });
    const w = new FakeWorker(nc, o);
    const names = poolNames(o.pool);
    const jsm = await jetstreamManager(nc);
    await jsm.streams
      .info(names.stream)
      .catch(() =>
        jsm.streams.add({ name: names.stream, subjects: [names.requests], retention: RetentionPolicy.Workqueue }),
      );
    await jsm.consumers
      .info(names.stream, names.consumer)
      .catch(() => jsm.consumers.add(names.stream, { durable_name: names.consumer, ack_policy: AckPolicy.Explicit }));
    nc.subscribe(names.cancel, {
      callback: (_, msg) => {
        const c = parseCancelMessage(msg.data);
        if (c.ok) w.cancelled.add(c.value.id);
      },
    });
    if (o.direct !== false) {
      nc.subscribe(w.directSubject, {
        callback: (_, msg) => {
          const parsed = parseRequestMessage(msg.data);
          if (!parsed.ok) return;
          const accepted = !o.refuseDirect;
          msg.respond(new TextEncoder().encode(JSON.stringify({ v: 1, id: parsed.value.id, accepted })));
          if (accepted) void w.#run(parsed.value, "direct");
        },
      });
    }
    w.#timer = setInterval(() => w.#report(), 200);
    w.#report();
    if (o.pull !== false) void w.#pull();
    await nc.flush();
    return w;
  }

  async #pull(): Promise<void> {
    const names = poolNames(this.o.pool);
    const consumer = await jetstream(this.nc).consumers.get(names.stream, names.consumer);
    while (!this.#stopped) {
      const msg = await consumer.next({ expires: 1000 }).catch(() => null);
      if (!msg) continue;
      const parsed = parseRequestMessage(msg.data);
      msg.ack();
      if (parsed.ok) void this.#run(parsed.value, "queue");
    }
  }

  #report(): void {
    if (this.#stopped) return;
    const report: LoadReport & { direct_subject?: string } = {
      v: PROTOCOL_VERSION,
      worker_id: this.o.workerId,
      pool: this.o.pool,
      model: this.o.model,
      ts: Date.now(),
      running: 0,
      waiting: 0,
      max_num_seqs: 8,
      kv_blocks_total: 100,
      kv_blocks_free: 100,
      kv_usage: 0,
      prefix_cache: { block_size: 16, hit_rate: 0, block_hashes: [] },
      tokens_per_second: 0,
      draining: false,
      ...(this.o.direct !== false ? { direct_subject: this.directSubject } : {}),
    };
    this.nc.publish(poolNames(this.o.pool).load, new TextEncoder().encode(JSON.stringify(report)));
  }

  async #run(req: RequestMessage, via: "queue" | "direct"): Promise<void> {
    this.received.push({ id: req.id, via });
    let seq = 0;
    const emit = (body: Record<string, unknown>) =>
      !this.#stopped &&
      this.nc.publish(
        req.reply_to,
        encodeMessage({ v: PROTOCOL_VERSION, id: req.id, seq: seq++, ...body } as TokenEvent),
      );
    const prefix =
      req.prompt.type === "chat" ? (req.prompt.messages[0]!.content ?? "") : JSON.stringify(req.prompt).slice(0, 16);
    const cached = this.#prefixes.has(prefix) ? CACHED_TOKENS : 0;
    this.#prefixes.add(prefix);
    emit({ type: "start", worker_id: this.o.workerId, queue_ms: 0 });
    const tokens = this.o.tokens?.(req) ?? ["Hello", " from", ` ${this.o.workerId}`];
    let n = 0;
    let finish: "stop" | "abort" = "stop";
    for (const text of tokens) {
      if (this.o.delayMs) await new Promise((r) => setTimeout(r, this.o.delayMs));
      if (this.cancelled.has(req.id) || this.#stopped) {
        finish = "abort";
        break;
      }
      emit({ type: "delta", text, token_ids: [1000 + n++] });
    }
    emit({
      type: "final",
      finish_reason: finish,
      usage: { prompt_tokens: 20, completion_tokens: n, cached_tokens: cached },
    });
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer !== undefined) clearInterval(this.#timer);
    await this.nc.close();
  }
}
