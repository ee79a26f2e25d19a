/**
 * Sending a request to one chosen worker (prefix affinity), next to the pool's JetStream queue.
 *
 * The protocol (shared/src/protocol.ts, PoolNames.direct; the worker side is gpu-worker/src/service/nats-worker.ts):
 * - A worker that takes addressed requests subscribes to its own subject, `directSubject(pool, token)`
 *   (`llama.pool.<pool>.worker.<token>`), and advertises it in its load reports as `direct_subject`.
 * - The gateway sends the usual RequestMessage there as a NATS *request*. The worker answers at once with
 *   `{"v":1,"id":<request id>,"accepted":true|false}`: true only if it would pull from the queue now (room in
 *   its scheduler, not draining), and if so it runs the request exactly like a pulled one (same events on
 *   reply_to, same cancel subject), with no JetStream ack or claim (there is no redelivery).
 * - Refused, no responders, or no answer within `acceptTimeoutMs`: the gateway publishes a cancel for that id
 *   (covering an acceptance that arrives late) and queues the request under a new id, so a late start can never
 *   duplicate text.
 *
 * @module
 */
import {
  CancelledError,
  DEFAULT_HEARTBEAT_TIMEOUT_MS,
  DirectReplySchema,
  type DispatchEvent,
  encodeMessage,
  finalAfterCancel,
  Mailbox,
  PROTOCOL_VERSION,
  ProtocolError,
  parseReplyMessage,
  parseRequestMessage,
  poolNames,
  type RequestMessageInput,
  type SubmitOptions,
  type SubmitRequest,
  WorkerError,
  WorkerLostError,
} from "@llama-edge/shared";
import { createInbox, type Msg, type NatsConnection } from "@nats-io/nats-core";

/** How long a cancelled request's final event is awaited (a worker aborts within one engine step). */
const CANCEL_FINAL_WAIT_MS = 2000;

export interface DirectOptions {
  signal: AbortSignal;
  /** As in the shared Dispatcher: the final event of a started request cancelled by the caller. */
  onCancelledFinal?: SubmitOptions["onCancelledFinal"];
  /** How long the worker has to accept. Default 250 ms: it answers before doing any work. */
  acceptTimeoutMs?: number;
  heartbeatTimeoutMs?: number;
  defaultDeadlineMs?: number;
}

/**
 * Offers `request` to the worker at `subject`. Resolves to its event stream if the worker accepted, or null if it
 * did not (the caller then queues the request under another id).
 */
export async function openDirect(
  nc: NatsConnection,
  subject: string,
  pool: string,
  request: SubmitRequest,
  opts: DirectOptions,
): Promise<AsyncGenerator<DispatchEvent, void> | null> {
  const now = Date.now();
  const message: RequestMessageInput = {
    ...request,
    v: PROTOCOL_VERSION,
    deadline: request.deadline ?? now + (opts.defaultDeadlineMs ?? 120_000),
    reply_to: createInbox(),
    submitted_at: now,
  };
  const data = encodeMessage(message as Parameters<typeof encodeMessage>[0]);
  // Invalid or too large: the queue path (the shared Dispatcher) reports it with the proper error.
  if (opts.signal.aborted || !parseRequestMessage(data).ok) return null;
  const mailbox = new Mailbox<Msg>();
  const sub = nc.subscribe(message.reply_to, { callback: (err, msg) => (err ? undefined : mailbox.push(msg)) });
  let accepted = false;
  try {
    const reply = await nc.request(subject, data, { timeout: opts.acceptTimeoutMs ?? 250 });
    const parsed = DirectReplySchema.safeParse(JSON.parse(new TextDecoder().decode(reply.data)));
    accepted = parsed.success && parsed.data.id === request.id && parsed.data.accepted;
  } catch {
    // no responders (the worker is gone or does not take addressed requests), timeout, or a garbled reply
  }
  if (!accepted) {
    sub.unsubscribe();
    cancel(nc, pool, request.id);
    return null;
  }
  return events(nc, pool, request.id, mailbox, sub, opts);
}

function cancel(nc: NatsConnection, pool: string, id: string): void {
  try {
    nc.publish(poolNames(pool).cancel, encodeMessage({ v: PROTOCOL_VERSION, id }));
  } catch {
    // connection closed: the worker's events go nowhere and its heartbeat check ends the request
  }
}

/** The accepted request's events, checked as the shared Dispatcher checks them (sequence, silence). */
async function* events(
  nc: NatsConnection,
  pool: string,
  id: string,
  mailbox: Mailbox<Msg>,
  sub: { unsubscribe(): void },
  opts: DirectOptions,
): AsyncGenerator<DispatchEvent, void> {
  const heartbeatTimeoutMs = opts.heartbeatTimeoutMs ?? DEFAULT_HEARTBEAT_TIMEOUT_MS;
  const onAbort = () => mailbox.fail(new CancelledError("aborted by the caller", id));
  opts.signal.addEventListener("abort", onAbort, { once: true });
  let silence: ReturnType<typeof setTimeout> | undefined;
  const arm = () => {
    if (silence !== undefined) clearTimeout(silence);
    silence = setTimeout(
      () => mailbox.fail(new WorkerLostError(`no event from the worker for ${heartbeatTimeoutMs} ms`, id)),
      heartbeatTimeoutMs,
    );
  };
  let finished = false;
  let workerLost = false;
  try {
    arm();
    let nextSeq = 0;
    for (;;) {
      const parsed = parseReplyMessage((await mailbox.next()).data);
      if (!parsed.ok) throw new ProtocolError(`invalid event from the worker: ${parsed.message}`, id);
      const ev = parsed.value;
      if (ev.id !== id || ev.type === "claim") throw new ProtocolError(`unexpected ${ev.type} for ${ev.id}`, id);
      if (ev.seq < nextSeq) continue; // duplicate
      if (ev.seq > nextSeq) throw new ProtocolError(`events ${nextSeq}..${ev.seq - 1} were lost`, id);
      nextSeq++;
      arm();
      if (ev.type === "error") {
        finished = true;
        throw new WorkerError(ev.code, ev.message, id);
      }
      yield ev;
      if (ev.type === "final") {
        finished = true;
        return;
      }
    }
  } catch (e) {
    workerLost = e instanceof WorkerLostError;
    throw e;
  } finally {
    if (silence !== undefined) clearTimeout(silence);
    opts.signal.removeEventListener("abort", onAbort);
    if (!finished) {
      cancel(nc, pool, id);
      // A silent worker is presumed dead: waiting for its final would only delay the error.
      const wait = opts.onCancelledFinal && !workerLost;
      const final = wait ? await finalAfterCancel(mailbox, id, CANCEL_FINAL_WAIT_MS) : null;
      if (final) opts.onCancelledFinal?.(final);
    }
    sub.unsubscribe();
  }
}
