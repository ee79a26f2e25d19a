/**
 * The gateway's side of the dispatch protocol: submit a request to a worker pool and iterate over its token events.
 * Depends only on a `NatsConnection` and JetStream, so it runs in Node over TCP (`@nats-io/transport-node`) and in
 * workerd over WebSocket (`wsconnect` from `@nats-io/nats-core`); the entry point picks the transport.
 *
 * A request goes to the pool's JetStream queue, or first to one chosen worker (`SubmitOptions.worker`, prefix
 * affinity; see PoolNames.direct): the worker answers the offer at once, and a refused offer is queued under a
 * new id. Either way the events are checked the same way (sequence, silence, claims) by one loop.
 *
 * @example
 * const dispatcher = new Dispatcher(nc);
 * for await (const ev of dispatcher.submit("default", { id, model, prompt: { type: "text", text: "Hi" } })) {
 *   if (ev.type === "delta") process.stdout.write(ev.text);
 * }
 *
 * @module
 */
import { type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { createInbox, InvalidArgumentError, type Msg, type NatsConnection } from "@nats-io/nats-core";
import {
  CancelledError,
  InvalidRequestError,
  NoWorkersError,
  ProtocolError,
  QueueTimeoutError,
  RequestTooLargeError,
  WorkerError,
  WorkerLostError,
} from "./errors.ts";
import { Mailbox } from "./mailbox.ts";
import {
  type ClaimMessage,
  DEFAULT_HEARTBEAT_TIMEOUT_MS,
  DirectReplySchema,
  encodeMessage,
  isValidPoolName,
  MAX_REQUEST_BYTES,
  PROTOCOL_VERSION,
  parseReplyMessage,
  poolNames,
  type RequestMessage,
  type RequestMessageInput,
  RequestMessageSchema,
  type TokenEvent,
} from "./protocol.ts";

/** setTimeout's limit (2^31 - 1 ms); a later deadline would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export interface DispatcherOptions {
  /** A started request fails with WorkerLostError after this long without an event. Must exceed the workers'
   *  heartbeat interval (1 s) by a few beats. Default 2500. */
  heartbeatTimeoutMs?: number;
  /** Bound on finding out that a pool has no stream or consumer (NoWorkersError). Default 2000. */
  poolCheckTimeoutMs?: number;
  /** A pool found present is not checked again for this long. Default 5000. */
  poolCheckTtlMs?: number;
  /** Deadline of requests that do not set one, from submission. Default 120 s. */
  defaultDeadlineMs?: number;
  /** Prefix of reply subjects (must match the permissions of the gateway's NATS user). Default `_INBOX`. */
  inboxPrefix?: string;
  /** How long to wait for the final event of a cancelled request (see SubmitOptions.onCancelledFinal). Default
   *  2000: a worker aborts within one engine step. */
  cancelFinalWaitMs?: number;
  /** How long a worker offered a request (SubmitOptions.worker) has to accept it. Default 250: it answers before
   *  doing any work. */
  acceptTimeoutMs?: number;
}

/** A request as the caller gives it: the dispatcher adds the version, the reply subject and the times. */
export type SubmitRequest = Omit<RequestMessageInput, "v" | "reply_to" | "deadline" | "submitted_at"> & {
  /** Epoch ms; default now + `defaultDeadlineMs`. */
  deadline?: number;
};

export interface SubmitOptions {
  /** Aborting cancels the request (at the worker too) and makes the iterator throw CancelledError. */
  signal?: AbortSignal;
  /**
   * When the caller stops a started request early (abort, or leaving the loop), the worker still sends a final
   * `abort` event with the exact usage: it is delivered here (within `cancelFinalWaitMs`), so whoever settles
   * usage need not estimate what a cancelled request consumed.
   */
  onCancelledFinal?: (final: Extract<DispatchEvent, { type: "final" }>) => void;
  /**
   * Offer the request to this worker first: its direct subject, from its load report. It runs the request only if
   * it accepts at once (room now, not draining); refused, unanswered or no responders, the request is queued under
   * the id `<id>-q` (a late acceptance of the refused id cannot then duplicate text: that id is cancelled).
   */
  worker?: string;
}

/** What the iterator yields; an `error` event is thrown as a WorkerError instead. */
export type DispatchEvent = Exclude<TokenEvent, { type: "error" }>;

export class Dispatcher {
  readonly #nc: NatsConnection;
  readonly #js: JetStreamClient;
  #jsm: Promise<JetStreamManager> | undefined;
  readonly #poolSeenAt = new Map<string, number>();
  readonly #opts: Required<DispatcherOptions>;

  constructor(nc: NatsConnection, opts: DispatcherOptions = {}) {
    this.#nc = nc;
    this.#opts = {
      heartbeatTimeoutMs: opts.heartbeatTimeoutMs ?? DEFAULT_HEARTBEAT_TIMEOUT_MS,
      poolCheckTimeoutMs: opts.poolCheckTimeoutMs ?? 2000,
      poolCheckTtlMs: opts.poolCheckTtlMs ?? 5000,
      defaultDeadlineMs: opts.defaultDeadlineMs ?? 120_000,
      inboxPrefix: opts.inboxPrefix ?? "_INBOX",
      cancelFinalWaitMs: opts.cancelFinalWaitMs ?? 2000,
      acceptTimeoutMs: opts.acceptTimeoutMs ?? 250,
    };
    this.#js = jetstream(nc, { timeout: this.#opts.poolCheckTimeoutMs });
  }

  /**
   * Submits `request` to `pool` and yields its events: `start`, then `heartbeat`s and `delta`s, then `final`.
   * Nothing is sent until the first `next()`. Leaving the loop early (break, return, throw) or aborting the signal
   * cancels the request. Failures throw a DispatchError subclass (see `errors`).
   */
  submit(pool: string, request: SubmitRequest, options: SubmitOptions = {}): AsyncGenerator<DispatchEvent, void> {
    return this.#run(pool, request, options);
  }

  async *#run(pool: string, request: SubmitRequest, options: SubmitOptions): AsyncGenerator<DispatchEvent, void> {
    let built = this.#buildMessage(pool, request);
    if (options.signal?.aborted) throw new CancelledError("aborted before submission", request.id);
    if (options.worker !== undefined) {
      const accepted = yield* this.#offer(pool, options.worker, built, options);
      if (accepted) return;
      built = this.#buildMessage(pool, { ...request, id: queuedIdAfterOffer(request.id) });
    }
    await this.#checkPool(pool, built.message.id);
    yield* this.#events(pool, built, options, (id) => this.#publish(pool, built.data, id));
  }

  /**
   * Offers the request to one worker. Runs it to its end (yielding its events) and returns true if the worker
   * accepted; false if it did not, after cancelling the id in case an acceptance is still on its way.
   */
  async *#offer(
    pool: string,
    subject: string,
    built: { message: RequestMessage; data: Uint8Array },
    options: SubmitOptions,
  ): AsyncGenerator<DispatchEvent, boolean> {
    const id = built.message.id;
    let accepted = false;
    const events = this.#events(pool, built, options, async () => {
      try {
        const reply = await this.#nc.request(subject, built.data, { timeout: this.#opts.acceptTimeoutMs });
        const parsed = DirectReplySchema.safeParse(reply.json());
        accepted = parsed.success && parsed.data.id === id && parsed.data.accepted;
      } catch {
        // no responders (the worker is gone or takes no addressed requests), timeout, or a garbled reply
      }
      if (!accepted) throw new NotAccepted();
      return undefined; // not on the queue: nothing to delete on cancel
    });
    try {
      yield* events;
      return true;
    } catch (e) {
      if (!(e instanceof NotAccepted)) throw e;
      this.#publishCancel(poolNames(pool), id);
      return false;
    }
  }

  /**
   * Subscribes to the request's reply subject, sends it (`send` returns the queue sequence, or undefined when it
   * went to one worker), and yields its events until the final one. Leaving early cancels it at the worker.
   */
  async *#events(
    pool: string,
    { message }: { message: RequestMessage },
    options: SubmitOptions,
    send: (id: string) => Promise<number | undefined>,
  ): AsyncGenerator<DispatchEvent, void> {
    const { signal, onCancelledFinal } = options;
    const id = message.id;
    const names = poolNames(pool);
    const mailbox = new Mailbox<Msg>();
    const sub = this.#nc.subscribe(message.reply_to, { callback: (err, msg) => (err ? undefined : mailbox.push(msg)) });
    const onAbort = () => mailbox.fail(new CancelledError("aborted by the caller", id));
    signal?.addEventListener("abort", onAbort, { once: true });
    let sent = false;
    let queuedSeq: number | undefined;
    let started = false;
    let finished = false;
    let workerLost = false;
    let queueTimer: ReturnType<typeof setTimeout> | undefined;
    let silenceTimer: ReturnType<typeof setTimeout> | undefined;
    const armSilenceTimer = () => {
      clearTimer(silenceTimer);
      silenceTimer = setTimeout(
        () => mailbox.fail(new WorkerLostError(`no event from the worker for ${this.#opts.heartbeatTimeoutMs} ms`, id)),
        this.#opts.heartbeatTimeoutMs,
      );
    };
    try {
      queuedSeq = await send(id);
      sent = true;
      queueTimer = setTimeout(
        () => mailbox.fail(new QueueTimeoutError("no worker started the request before its deadline", id)),
        Math.min(MAX_TIMER_MS, Math.max(0, message.deadline - Date.now())),
      );
      let nextSeq = 0;
      let workerId: string | undefined;
      for (;;) {
        const msg = await mailbox.next();
        const parsed = parseReplyMessage(msg.data);
        if (!parsed.ok) throw new ProtocolError(`invalid event from the worker: ${parsed.message}`, id);
        const ev = parsed.value;
        if (ev.id !== id) throw new ProtocolError(`event for request ${ev.id} on this request's subject`, id);
        if (ev.type === "claim") {
          // Grant a redelivered request only if no other worker started it (see ClaimMessageSchema).
          const granted = !started && (workerId === undefined || workerId === ev.worker_id);
          if (granted) {
            workerId = ev.worker_id;
            armSilenceTimer();
          }
          respondToClaim(msg, ev, granted);
          continue;
        }
        if (ev.seq < nextSeq) continue; // duplicate: already delivered, dropping it keeps the text exact
        if (ev.seq > nextSeq) throw new ProtocolError(`events ${nextSeq}..${ev.seq - 1} were lost`, id);
        nextSeq++;
        armSilenceTimer();
        switch (ev.type) {
          case "start":
            if (workerId !== undefined && workerId !== ev.worker_id) {
              throw new ProtocolError(`started by ${ev.worker_id}, but ${workerId} claimed it`, id);
            }
            workerId = ev.worker_id;
            started = true;
            clearTimer(queueTimer);
            yield ev;
            break;
          case "error":
            finished = true;
            throw new WorkerError(ev.code, ev.message, id);
          case "final":
            finished = true;
            yield ev;
            return;
          default:
            yield ev;
        }
      }
    } catch (e) {
      workerLost = e instanceof WorkerLostError;
      throw e;
    } finally {
      clearTimer(queueTimer);
      clearTimer(silenceTimer);
      signal?.removeEventListener("abort", onAbort);
      if (sent && !finished) {
        this.#cancel(names, id, started ? undefined : queuedSeq);
        // A silent worker is presumed dead: its final will not come, and waiting would only delay the error.
        if (started && onCancelledFinal && !workerLost) {
          const final = await finalAfterCancel(mailbox, id, this.#opts.cancelFinalWaitMs);
          if (final) onCancelledFinal(final);
        }
      }
      sub.unsubscribe();
    }
  }

  #buildMessage(pool: string, request: SubmitRequest): { message: RequestMessage; data: Uint8Array } {
    if (!isValidPoolName(pool)) throw new InvalidRequestError(`invalid pool name ${JSON.stringify(pool)}`, request.id);
    const now = Date.now();
    const parsed = RequestMessageSchema.safeParse({
      ...request,
      v: PROTOCOL_VERSION,
      deadline: request.deadline ?? now + this.#opts.defaultDeadlineMs,
      reply_to: createInbox(this.#opts.inboxPrefix),
      submitted_at: now,
    });
    if (!parsed.success) {
      const issues = parsed.error.issues.map((i) => `${i.path.join(".")}: ${i.message}`).join("; ");
      throw new InvalidRequestError(`invalid request: ${issues}`, request.id);
    }
    const data = encodeMessage(parsed.data);
    if (data.byteLength > MAX_REQUEST_BYTES) {
      throw new RequestTooLargeError(`request is ${data.byteLength} bytes, limit ${MAX_REQUEST_BYTES}`, request.id);
    }
    return { message: parsed.data, data };
  }

  /** Without a consumer nobody would ever pull the request: fail fast instead of waiting for the deadline. */
  async #checkPool(pool: string, id: string): Promise<void> {
    const seenAt = this.#poolSeenAt.get(pool);
    if (seenAt !== undefined && Date.now() - seenAt < this.#opts.poolCheckTtlMs) return;
    const { stream, consumer } = poolNames(pool);
    try {
      const jsm = await this.#manager();
      await jsm.consumers.info(stream, consumer);
      this.#poolSeenAt.set(pool, Date.now());
    } catch (e) {
      this.#jsm = undefined; // a failed manager (e.g. created while disconnected) is retried next time
      throw new NoWorkersError(`no worker pool "${pool}" (${stream}/${consumer}): ${(e as Error).message}`, id, {
        cause: e,
      });
    }
  }

  #manager(): Promise<JetStreamManager> {
    this.#jsm ??= jetstreamManager(this.#nc, { timeout: this.#opts.poolCheckTimeoutMs, checkAPI: false });
    return this.#jsm;
  }

  async #publish(pool: string, data: Uint8Array, id: string): Promise<number> {
    let ack: Awaited<ReturnType<JetStreamClient["publish"]>>;
    try {
      // msgID: JetStream drops a second publish of the same id within its duplicate window.
      ack = await this.#js.publish(poolNames(pool).requests, data, {
        msgID: id,
        timeout: this.#opts.poolCheckTimeoutMs,
        retries: 0,
      });
    } catch (e) {
      // Larger than the server's max_payload: no worker could ever take it.
      if (e instanceof InvalidArgumentError) throw new RequestTooLargeError((e as Error).message, id, { cause: e });
      this.#poolSeenAt.delete(pool);
      throw new NoWorkersError(`could not queue the request: ${(e as Error).message}`, id, { cause: e });
    }
    if (ack.duplicate) throw new InvalidRequestError(`request id ${id} was already submitted`, id);
    return ack.seq;
  }

  /** Best effort: tell the pool to drop the request, and take it off the queue if no worker started it. */
  #publishCancel(names: ReturnType<typeof poolNames>, id: string): void {
    try {
      this.#nc.publish(names.cancel, encodeMessage({ v: PROTOCOL_VERSION, id }));
    } catch {
      // connection closed: the worker's heartbeats go nowhere and the deadline bounds a queued request
    }
  }

  #cancel(names: ReturnType<typeof poolNames>, id: string, queuedSeq: number | undefined): void {
    this.#publishCancel(names, id);
    if (queuedSeq !== undefined) {
      this.#manager()
        .then((jsm) => jsm.streams.deleteMessage(names.stream, queuedSeq, false))
        .catch(() => {}); // already pulled (the cancel covers it) or gone
    }
  }
}

/** The id under which a request whose offer to one worker was refused is queued. */
export const queuedIdAfterOffer = (id: string): string => `${id}-q`;

/** Thrown inside #offer when the worker did not accept (never escapes the Dispatcher). */
class NotAccepted extends Error {}

/** clearTimeout that accepts "no timer" in every runtime (workerd's typings reject undefined). */
function clearTimer(t: ReturnType<typeof setTimeout> | undefined): void {
  if (t !== undefined) clearTimeout(t);
}

/** The final event of a request just cancelled, if it arrives within `waitMs` (other events are skipped). */
export async function finalAfterCancel(
  mailbox: Mailbox<Msg>,
  id: string,
  waitMs: number,
): Promise<Extract<DispatchEvent, { type: "final" }> | null> {
  mailbox.clearFailure();
  const timer = setTimeout(() => mailbox.fail(new CancelledError("no final event after the cancel", id)), waitMs);
  try {
    for (;;) {
      const parsed = parseReplyMessage((await mailbox.next()).data);
      if (parsed.ok && parsed.value.id === id && parsed.value.type === "final") return parsed.value;
      if (parsed.ok && parsed.value.id === id && parsed.value.type === "error") return null;
    }
  } catch {
    return null;
  } finally {
    clearTimeout(timer);
  }
}

function respondToClaim(msg: Msg, claim: ClaimMessage, granted: boolean): void {
  msg.respond(encodeMessage({ v: PROTOCOL_VERSION, id: claim.id, granted }));
}
