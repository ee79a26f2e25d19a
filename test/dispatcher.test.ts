/**
 * The dispatcher against a real nats-server and a scripted worker (this file plays the worker's side of the
 * protocol by hand), so each failure the gateway must handle can be produced on purpose: no pool, a queue that
 * never moves, a silent worker, lost and duplicated events, claims on redelivered requests. Also runs once over
 * WebSocket, the transport the edge uses.
 */
import {
  CancelledError,
  type DispatchEvent,
  Dispatcher,
  directSubject,
  encodeMessage,
  MAX_REQUEST_BYTES,
  NoWorkersError,
  PROTOCOL_VERSION,
  ProtocolError,
  parseCancelMessage,
  parseClaimReply,
  parseRequestMessage,
  poolNames,
  QueueTimeoutError,
  type RequestMessage,
  RequestTooLargeError,
  WorkerError,
  WorkerLostError,
} from "@llama-edge/shared";
import { type JsMsg, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { type NatsConnection, wsconnect } from "@nats-io/nats-core";
import { connect } from "@nats-io/transport-node";
import { WebSocket } from "undici";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { ensurePool } from "../gpu-worker/src/service/pool-setup.ts";
import { startTestNats, type TestNats } from "./helpers/nats-server.ts";

let nats: TestNats;
let nc: NatsConnection;
let poolCount = 0;

beforeAll(async () => {
  nats = await startTestNats();
  nc = await connect({ servers: nats.url });
});

afterAll(async () => {
  await nc?.close();
  await nats?.stop();
});

/** A fresh pool with its stream and consumer, and no worker. */
async function newPool(ackWaitMs = 30_000): Promise<string> {
  const pool = `d${poolCount++}`;
  await ensurePool(await jetstreamManager(nc), pool, { ackWaitMs });
  return pool;
}

/** The scripted worker: pulls one request and sends whatever events the test wants. */
async function pull(pool: string): Promise<{ msg: JsMsg; req: RequestMessage; send: (ev: object) => void }> {
  const { stream, consumer } = poolNames(pool);
  const c = await jetstream(nc).consumers.get(stream, consumer);
  const msg = await c.next({ expires: 5000 });
  if (!msg) throw new Error("nothing to pull");
  const parsed = parseRequestMessage(msg.data);
  if (!parsed.ok) throw new Error(parsed.message);
  const req = parsed.value;
  return {
    msg,
    req,
    send: (ev) => nc.publish(req.reply_to, JSON.stringify({ v: PROTOCOL_VERSION, id: req.id, ...ev })),
  };
}

async function collect(it: AsyncIterable<DispatchEvent>): Promise<{ events: DispatchEvent[]; error?: Error }> {
  const events: DispatchEvent[] = [];
  try {
    for await (const ev of it) events.push(ev);
    return { events };
  } catch (e) {
    return { events, error: e as Error };
  }
}

const req = (id: string) => ({ id, model: "m", prompt: { type: "text" as const, text: "hi" } });
const start = (seq = 0) => ({ seq, type: "start", worker_id: "w1", queue_ms: 1 });
const delta = (seq: number, text: string) => ({ seq, type: "delta", text, token_ids: [seq] });
const final = (seq: number) => ({
  seq,
  type: "final",
  finish_reason: "stop",
  usage: { prompt_tokens: 1, completion_tokens: 2, cached_tokens: 0 },
});

describe("dispatcher", () => {
  test("a pool without a stream, or without a consumer, fails fast with NoWorkersError", async () => {
    const d = new Dispatcher(nc, { poolCheckTimeoutMs: 1000 });
    const t0 = Date.now();
    const r = await collect(d.submit("nobody-here", req("a")));
    expect(r.error).toBeInstanceOf(NoWorkersError);
    expect((r.error as NoWorkersError).status).toBe(503);
    expect(Date.now() - t0).toBeLessThan(1500);

    const jsm = await jetstreamManager(nc);
    const names = poolNames("stream-only");
    await jsm.streams.add({ name: names.stream, subjects: [names.requests] });
    const r2 = await collect(d.submit("stream-only", req("b")));
    expect(r2.error).toBeInstanceOf(NoWorkersError);
    expect((await jsm.streams.info(names.stream)).state.messages).toBe(0); // nothing was queued
  });

  test("a queue that does not move past the deadline gives QueueTimeoutError and leaves the queue", async () => {
    const pool = await newPool();
    const t0 = Date.now();
    const r = await collect(new Dispatcher(nc).submit(pool, { ...req("slow"), deadline: Date.now() + 600 }));
    expect(r.error).toBeInstanceOf(QueueTimeoutError);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(550);
    const jsm = await jetstreamManager(nc);
    await new Promise((res) => setTimeout(res, 100)); // the delete is fire-and-forget
    expect((await jsm.streams.info(poolNames(pool).stream)).state.messages).toBe(0);
  });

  test("streams events in order; drops duplicates; a gap is a ProtocolError", async () => {
    const pool = await newPool();
    const d = new Dispatcher(nc);
    const ok = collect(d.submit(pool, req("ok")));
    const w = await pull(pool);
    w.send(start());
    w.send(delta(1, "Hel"));
    w.send(delta(1, "Hel"));
    w.send(delta(2, "lo"));
    w.send({ seq: 3, type: "heartbeat" });
    w.send(final(4));
    const r = await ok;
    expect(r.error).toBeUndefined();
    expect(r.events.map((e) => e.type)).toEqual(["start", "delta", "delta", "heartbeat", "final"]);
    expect(r.events.map((e) => (e.type === "delta" ? e.text : "")).join("")).toBe("Hello");

    const gap = collect(d.submit(pool, req("gap")));
    const w2 = await pull(pool);
    const cancels = nc.subscribe(poolNames(pool).cancel, { max: 1 });
    w2.send(start());
    w2.send(delta(2, "lost one"));
    const r2 = await gap;
    expect(r2.error).toBeInstanceOf(ProtocolError);
    for await (const m of cancels) expect(parseCancelMessage(m.data)).toMatchObject({ ok: true, value: { id: "gap" } });
  });

  test("a worker's error event is thrown as WorkerError with its code", async () => {
    const pool = await newPool();
    const p = collect(new Dispatcher(nc).submit(pool, req("e")));
    const w = await pull(pool);
    w.send({ seq: 0, type: "error", code: "bad_request", message: "top_p must be in (0, 1]" });
    const r = await p;
    expect(r.error).toBeInstanceOf(WorkerError);
    expect(r.error).toMatchObject({ code: "bad_request", status: 400 });
  });

  test("a worker silent past the heartbeat timeout gives WorkerLostError; heartbeats keep it alive", async () => {
    const pool = await newPool();
    const d = new Dispatcher(nc, { heartbeatTimeoutMs: 600 });
    const beating = collect(d.submit(pool, req("beating")));
    const w = await pull(pool);
    w.send(start());
    for (let seq = 1; seq <= 4; seq++) {
      await new Promise((r) => setTimeout(r, 300));
      w.send({ seq, type: "heartbeat" });
    }
    w.send(final(5));
    expect((await beating).error).toBeUndefined();

    const silent = collect(d.submit(pool, req("silent")));
    const w2 = await pull(pool);
    w2.send(start());
    const t0 = Date.now();
    const r = await silent;
    expect(r.error).toBeInstanceOf(WorkerLostError);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(550);
    expect(Date.now() - t0).toBeLessThan(1500);
  });

  test("a lost worker's error is not held back waiting for the final a cancel would bring", async () => {
    const pool = await newPool();
    // A dead worker sends no `abort` final: the error must not wait cancelFinalWaitMs for it.
    const d = new Dispatcher(nc, { heartbeatTimeoutMs: 600, cancelFinalWaitMs: 60_000 });
    const finals: unknown[] = [];
    const silent = collect(d.submit(pool, req("lost"), { onCancelledFinal: (f) => finals.push(f) }));
    const w = await pull(pool);
    w.send(start());
    w.send(delta(1, "a"));
    const r = await silent;
    expect(r.error).toBeInstanceOf(WorkerLostError);
    expect(r.events.map((e) => e.type)).toEqual(["start", "delta"]);
    expect(finals).toEqual([]);
  }, 20_000); // waiting for the final would take 60 s

  test("a redelivered request's claim is granted before any start and refused after one", async () => {
    const pool = await newPool();
    const d = new Dispatcher(nc);
    const claim = async (id: string, replyTo: string, workerId: string) => {
      const reply = await nc.request(
        replyTo,
        encodeMessage({ v: PROTOCOL_VERSION, type: "claim", id, worker_id: workerId }),
      );
      const parsed = parseClaimReply(reply.data);
      return parsed.ok && parsed.value.granted;
    };
    const p = collect(d.submit(pool, req("claimed")));
    const w = await pull(pool);
    expect(await claim("claimed", w.req.reply_to, "w2")).toBe(true);
    w.send({ ...start(), worker_id: "w2" });
    expect(await claim("claimed", w.req.reply_to, "w3")).toBe(false);
    w.send(final(1));
    expect((await p).error).toBeUndefined();
  });

  test("aborting the signal throws CancelledError and publishes a cancel", async () => {
    const pool = await newPool();
    const ac = new AbortController();
    const cancels = nc.subscribe(poolNames(pool).cancel, { max: 1 });
    const events: DispatchEvent[] = [];
    const p = (async () => {
      try {
        for await (const ev of new Dispatcher(nc).submit(pool, req("abort-me"), { signal: ac.signal })) {
          events.push(ev);
          if (ev.type === "delta") ac.abort();
        }
      } catch (e) {
        return e;
      }
    })();
    const w = await pull(pool);
    w.send(start());
    w.send(delta(1, "x"));
    expect(await p).toBeInstanceOf(CancelledError);
    for await (const m of cancels)
      expect(parseCancelMessage(m.data)).toMatchObject({ ok: true, value: { id: "abort-me" } });
  });

  test("leaving a started request early still delivers the worker's final abort event (exact usage)", async () => {
    const pool = await newPool();
    const cancels = nc.subscribe(poolNames(pool).cancel, { max: 1 });
    let lateFinal: DispatchEvent | undefined;
    const p = (async () => {
      const it = new Dispatcher(nc).submit(pool, req("leave-early"), { onCancelledFinal: (f) => (lateFinal = f) });
      for await (const ev of it) if (ev.type === "delta") break; // the client went away
    })();
    const w = await pull(pool);
    w.send(start());
    w.send(delta(1, "x"));
    // the worker sees the cancel, aborts, and reports what it computed
    for await (const _ of cancels) {
      w.send({
        seq: 2,
        type: "final",
        finish_reason: "abort",
        usage: { prompt_tokens: 7, completion_tokens: 3, cached_tokens: 0 },
      });
    }
    await p;
    expect(lateFinal).toMatchObject({
      type: "final",
      finish_reason: "abort",
      usage: { prompt_tokens: 7, completion_tokens: 3 },
    });
  });

  test("a request larger than a worker takes fails with RequestTooLargeError before it is sent", async () => {
    const pool = await newPool();
    const big = { ...req("big"), prompt: { type: "text" as const, text: "x".repeat(MAX_REQUEST_BYTES) } };
    const r = await collect(new Dispatcher(nc).submit(pool, big));
    expect(r.error).toBeInstanceOf(RequestTooLargeError);
    expect((r.error as RequestTooLargeError).status).toBe(413);
  });

  test("an offer to one worker (SubmitOptions.worker) runs there when it accepts", async () => {
    const pool = await newPool();
    const subject = directSubject(pool, "w1");
    const sub = nc.subscribe(subject, {
      max: 1,
      callback: (_, msg) => {
        const r = parseRequestMessage(msg.data);
        if (!r.ok) throw new Error(r.message);
        msg.respond(JSON.stringify({ v: PROTOCOL_VERSION, id: r.value.id, accepted: true }));
        const send = (ev: object) =>
          nc.publish(r.value.reply_to, JSON.stringify({ v: PROTOCOL_VERSION, id: r.value.id, ...ev }));
        send(start());
        send(delta(1, "direct"));
        send(final(2));
      },
    });
    const r = await collect(new Dispatcher(nc).submit(pool, req("offered"), { worker: subject }));
    expect(r.error).toBeUndefined();
    expect(r.events.map((e) => e.type)).toEqual(["start", "delta", "final"]);
    expect(r.events.every((e) => e.id === "offered")).toBe(true);
    await sub.closed;
  });

  test("a refused or unanswered offer is queued under <id>-q, and the refused id is cancelled", async () => {
    const pool = await newPool();
    const subject = directSubject(pool, "w2");
    nc.subscribe(subject, {
      max: 1,
      callback: (_, msg) => {
        const r = parseRequestMessage(msg.data);
        if (r.ok) msg.respond(JSON.stringify({ v: PROTOCOL_VERSION, id: r.value.id, accepted: false }));
      },
    });
    const cancels = nc.subscribe(poolNames(pool).cancel, { max: 1 });
    const d = new Dispatcher(nc);
    const refused = collect(d.submit(pool, req("refused"), { worker: subject }));
    const w = await pull(pool);
    expect(w.req.id).toBe("refused-q");
    w.send(start());
    w.send(final(1));
    expect((await refused).events.map((e) => e.type)).toEqual(["start", "final"]);
    for await (const m of cancels) expect(parseCancelMessage(m.data)).toMatchObject({ value: { id: "refused" } });

    // Nobody listens on the subject (the worker is gone): queued as well.
    const gone = collect(d.submit(pool, req("gone"), { worker: directSubject(pool, "nobody") }));
    const w2 = await pull(pool);
    expect(w2.req.id).toBe("gone-q");
    w2.send(start());
    w2.send(final(1));
    expect((await gone).error).toBeUndefined();
  });

  test("cancelling an accepted offer cancels it at that worker, whose final abort event is delivered", async () => {
    const pool = await newPool();
    const subject = directSubject(pool, "w3");
    const cancels = nc.subscribe(poolNames(pool).cancel, { max: 1 });
    let send: (ev: object) => void = () => {};
    nc.subscribe(subject, {
      max: 1,
      callback: (_, msg) => {
        const r = parseRequestMessage(msg.data);
        if (!r.ok) return;
        msg.respond(JSON.stringify({ v: PROTOCOL_VERSION, id: r.value.id, accepted: true }));
        send = (ev) => nc.publish(r.value.reply_to, JSON.stringify({ v: PROTOCOL_VERSION, id: r.value.id, ...ev }));
        send(start());
        send(delta(1, "x"));
      },
    });
    let lateFinal: DispatchEvent | undefined;
    const opts = { worker: subject, onCancelledFinal: (f: DispatchEvent) => (lateFinal = f) };
    const p = (async () => {
      for await (const ev of new Dispatcher(nc).submit(pool, req("direct-cut"), opts)) if (ev.type === "delta") break;
    })();
    for await (const m of cancels) {
      expect(parseCancelMessage(m.data)).toMatchObject({ value: { id: "direct-cut" } });
      const usage = { prompt_tokens: 4, completion_tokens: 1, cached_tokens: 0 };
      send({ seq: 2, type: "final", finish_reason: "abort", usage });
    }
    await p;
    expect(lateFinal).toMatchObject({ finish_reason: "abort", usage: { completion_tokens: 1 } });
  });

  test("works over WebSocket (the edge's transport)", async () => {
    const pool = await newPool();
    const ws = await wsconnect({
      servers: nats.wsUrl,
      // Node 20 has no global WebSocket; workerd and Node 22 do.
      wsFactory: async (url) => ({ socket: new WebSocket(url) as unknown as globalThis.WebSocket, encrypted: false }),
    });
    try {
      const p = collect(new Dispatcher(ws).submit(pool, req("over-ws")));
      const w = await pull(pool);
      w.send(start());
      w.send(delta(1, "hi"));
      w.send(final(2));
      const r = await p;
      expect(r.error).toBeUndefined();
      expect(r.events.map((e) => e.type)).toEqual(["start", "delta", "final"]);
    } finally {
      await ws.close();
    }
  });
});
