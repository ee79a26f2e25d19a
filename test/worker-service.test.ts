/**
 * The worker service against a real nats-server and the real engine with the default (tiny, random-weight) model:
 * the dispatcher submits, workers pull and stream, and we break things (kill -9, SIGTERM, a NATS restart, cancels,
 * garbage on the request subject).
 *
 * Workers that get killed or signalled run as `llama-worker serve` child processes; the rest run in this process
 * (engine in its thread, as in production), which lets the cancel test read the engine's stats.
 */
import {
  CancelledError,
  DirectReplySchema,
  type DispatchEvent,
  Dispatcher,
  MAX_REQUEST_BYTES,
  PROTOCOL_VERSION,
  parseLoadReport,
  parseReplyMessage,
  poolNames,
  type SubmitRequest,
  type TokenEvent,
  WorkerLostError,
} from "@llama-edge/shared";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { createInbox, type NatsConnection } from "@nats-io/nats-core";
import { connect } from "@nats-io/transport-node";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { ensureDefaultModel } from "../gpu-worker/src/model/default-model.ts";
import { EngineHost } from "../gpu-worker/src/service/engine-host.ts";
import { NatsWorker } from "../gpu-worker/src/service/nats-worker.ts";
import { ensurePool } from "../gpu-worker/src/service/pool-setup.ts";
import { startTestNats, type TestNats } from "./helpers/nats-server.ts";
import { startWorkerProcess, type WorkerProcess } from "./helpers/worker-process.ts";

let nats: TestNats;
let nc: NatsConnection;
let dispatcher: Dispatcher;
let host: EngineHost;
let inproc: NatsWorker;
let model: string;
const children: WorkerProcess[] = [];
const IN_PROC_POOL = "inproc";

/** 200 tokens take a second or more here: long enough to act on a request mid-stream. */
const LONG = { temperature: 0, max_tokens: 200, ignore_eos: true };

beforeAll(async () => {
  nats = await startTestNats();
  const modelDir = await ensureDefaultModel("default", { quiet: true });
  host = await EngineHost.start({ engineOptions: { modelDir, maxNumSeqs: 4 } });
  model = host.config.modelName;
  const started = await NatsWorker.start({
    servers: nats.url,
    pool: IN_PROC_POOL,
    workerId: "inproc-1",
    engine: host,
    logger: pino({ level: process.env.LLAMA_TEST_LOG ?? "silent" }),
  });
  if (!started) throw new Error("in-process worker did not start");
  inproc = started;
  nc = await connect({ servers: nats.url, maxReconnectAttempts: -1, reconnectTimeWait: 250 });
  dispatcher = new Dispatcher(nc);
});

afterAll(async () => {
  for (const c of children) c.kill("SIGKILL");
  await inproc?.close();
  await host?.close();
  await nc?.close();
  await nats?.stop();
});

interface Outcome {
  events: DispatchEvent[];
  text: string;
  workerId?: string;
  final?: Extract<DispatchEvent, { type: "final" }>;
  error?: Error;
}

async function run(
  pool: string,
  req: SubmitRequest,
  opts: { signal?: AbortSignal; onEvent?: (e: DispatchEvent) => void } = {},
): Promise<Outcome> {
  const out: Outcome = { events: [], text: "" };
  try {
    for await (const ev of dispatcher.submit(pool, req, { signal: opts.signal })) {
      out.events.push(ev);
      opts.onEvent?.(ev);
      if (ev.type === "start") out.workerId = ev.worker_id;
      if (ev.type === "delta") out.text += ev.text;
      if (ev.type === "final") out.final = ev;
    }
  } catch (e) {
    out.error = e as Error;
  }
  return out;
}

const textPrompt = (text: string) => ({ type: "text" as const, text });
let nextId = 0;
const rid = (tag: string) => `${tag}-${nextId++}-${Date.now()}`;

/** The text the engine generates for `prompt` alone (greedy), for comparison with what went through NATS. */
async function reference(prompt: string, maxTokens: number): Promise<string> {
  let text = "";
  for await (const ev of host.submit({ requestId: rid("ref"), prompt, sampling: { temperature: 0, maxTokens } })) {
    if (ev.type === "delta") text += ev.text;
  }
  return text;
}

async function until<T>(probe: () => T | Promise<T>, ok: (v: T) => boolean, timeoutMs: number): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (ok(v) || Date.now() > end) return v;
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function consumerState(pool: string) {
  const jsm = await jetstreamManager(nc);
  const { stream, consumer } = poolNames(pool);
  const ci = await jsm.consumers.info(stream, consumer);
  return { pending: ci.num_pending, ackPending: ci.num_ack_pending };
}

/** Nothing queued and nothing ack-pending on the pool's consumer (waits up to 2 s for the last acks). */
async function expectQueueEmpty(pool: string): Promise<void> {
  const state = await until(
    () => consumerState(pool),
    (st) => st.pending + st.ackPending === 0,
    2000,
  );
  expect(state).toEqual({ pending: 0, ackPending: 0 });
}

async function spawnWorker(pool: string, workerId: string, args: string[] = []): Promise<WorkerProcess> {
  const w = await startWorkerProcess({ natsUrl: nats.url, pool, workerId, args });
  children.push(w);
  return w;
}

describe("worker service over NATS", () => {
  test("two workers on one pool share a burst; every request completes exactly once with the right text", async () => {
    const pool = "burst";
    const [a, b] = await Promise.all([
      spawnWorker(pool, "burst-a", ["--max-num-seqs", "2"]),
      spawnWorker(pool, "burst-b", ["--max-num-seqs", "2"]),
    ]);
    const prompts = Array.from({ length: 8 }, (_, i) => `Once upon a time, story number ${i}`);
    const expected = [];
    for (const p of prompts) expected.push(await reference(p, 8));

    const ids = prompts.map(() => rid("burst"));
    const results = await Promise.all(
      prompts.map((p, i) =>
        run(pool, { id: ids[i], model, prompt: textPrompt(p), sampling: { temperature: 0, max_tokens: 8 } }),
      ),
    );
    for (const [i, r] of results.entries()) {
      expect(r.error).toBeUndefined();
      expect(r.final?.finish_reason).toBe("length");
      expect(r.final?.usage.completion_tokens).toBe(8);
      expect(r.text).toBe(expected[i]);
      expect(r.events.filter((e) => e.type === "start")).toHaveLength(1);
    }
    expect(new Set(results.map((r) => r.workerId))).toEqual(new Set(["burst-a", "burst-b"]));
    // Exactly once: one admission per request across both workers, and nothing left in the queue.
    const admitted = [...a.logs, ...b.logs].filter((l) => l.msg === "admitted").map((l) => l.request_id);
    expect(admitted.sort()).toEqual([...ids].sort());
    await expectQueueEmpty(pool);
    // Health and metrics, as Kubernetes and Prometheus see them.
    const port = a.logs.find((l) => l.msg === "health server listening")?.port;
    expect((await fetch(`http://127.0.0.1:${port}/healthz`)).status).toBe(200);
    expect((await fetch(`http://127.0.0.1:${port}/readyz`)).status).toBe(200);
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    const completed = /llama_worker_requests_total\{[^}]*outcome="completed"[^}]*\} (\d+)/.exec(metrics);
    expect(Number(completed?.[1])).toBe(a.logs.filter((l) => l.msg === "admitted").length);
    expect(metrics).toMatch(/llama_worker_kv_cache_blocks\{[^}]*worker_id="burst-a"[^}]*\} \d+/);
    a.kill();
    b.kill();
    expect(await Promise.all([a.exited, b.exited])).toEqual([0, 0]);
  });

  test("kill -9 mid-stream: the requester gets an error within 3 s; a queued request is served by the other worker", async () => {
    const pool = "kill";
    // ack-wait 3 s: the dead worker's request comes back quickly, so we can watch it being dropped, not rerun.
    const args = ["--max-num-seqs", "1", "--ack-wait", "3"];
    const workers = await Promise.all([spawnWorker(pool, "kill-a", args), spawnWorker(pool, "kill-b", args)]);

    const started = new Map<string, string>();
    let r1Deltas = 0;
    const onStart = (id: string) => (e: DispatchEvent) => {
      if (e.type === "start") started.set(id, e.worker_id);
      if (id === "r1" && e.type === "delta") r1Deltas++;
    };
    const [id1, id2, id3] = [rid("kill-r1"), rid("kill-r2"), rid("kill-r3")];
    const r1 = run(
      pool,
      { id: id1, model, prompt: textPrompt("The dragon"), sampling: LONG },
      { onEvent: onStart("r1") },
    );
    const r2 = run(
      pool,
      { id: id2, model, prompt: textPrompt("The knight"), sampling: LONG },
      { onEvent: onStart("r2") },
    );
    await until(
      () => started.size,
      (n) => n === 2,
      10_000,
    );
    // Both workers are full (max_num_seqs 1): r3 waits in the queue, admitted by no one.
    const r3 = run(
      pool,
      { id: id3, model, prompt: textPrompt("The castle"), sampling: { temperature: 0, max_tokens: 8 } },
      { onEvent: onStart("r3") },
    );
    await until(
      () => r1Deltas,
      (n) => n >= 5,
      10_000,
    );
    expect(started.has("r3")).toBe(false);

    const victim = workers.find((w) => w.workerId === started.get("r1"))!;
    const survivor = workers.find((w) => w !== victim)!;
    const killedAt = Date.now();
    victim.kill("SIGKILL");
    const lost = await r1;
    expect(lost.error).toBeInstanceOf(WorkerLostError);
    expect(Date.now() - killedAt).toBeLessThan(3000);

    const [done2, done3] = await Promise.all([r2, r3]);
    expect(done2.final?.finish_reason).toBe("length");
    expect(done3.error).toBeUndefined();
    expect(done3.workerId).toBe(survivor.workerId);
    expect(done3.final?.usage.completion_tokens).toBe(8);

    // JetStream redelivers r1 once its ack_wait runs out. The survivor must drop it, not run it again: it knows
    // from the requester's cancel (sent when it gave up), or else from the claim the requester no longer answers.
    await survivor.waitForLog((l) => l.request_id === id1 && /dropped/.test(String(l.msg)), 15_000);
    expect(survivor.logs.some((l) => l.msg === "admitted" && l.request_id === id1)).toBe(false);
    await expectQueueEmpty(pool);
    survivor.kill();
    expect(await survivor.exited).toBe(0);
  });

  test("SIGTERM with streams in flight: they complete, the process exits 0, no new request is taken", async () => {
    const pool = "drain";
    const w = await spawnWorker(pool, "drain-a", ["--max-num-seqs", "2"]);
    const deltas = new Map<string, number>();
    const count = (id: string) => (e: DispatchEvent) => {
      if (e.type === "delta") deltas.set(id, (deltas.get(id) ?? 0) + 1);
    };
    const sampling = { ...LONG, max_tokens: 120 };
    const r1 = run(
      pool,
      { id: rid("drain-r1"), model, prompt: textPrompt("Tom had"), sampling },
      { onEvent: count("r1") },
    );
    const r2 = run(
      pool,
      { id: rid("drain-r2"), model, prompt: textPrompt("Lily saw"), sampling },
      { onEvent: count("r2") },
    );
    await until(
      () => Math.min(deltas.get("r1") ?? 0, deltas.get("r2") ?? 0),
      (n) => n >= 3,
      10_000,
    );
    // Running requests stay ack-pending: KEDA's lag (pending + ack pending) counts them.
    expect(await consumerState(pool)).toEqual({ pending: 0, ackPending: 2 });

    w.kill("SIGTERM");
    await w.waitForLog((l) => l.msg === "draining: no new requests", 5000);
    const port = w.logs.find((l) => l.msg === "health server listening")?.port;
    expect((await fetch(`http://127.0.0.1:${port}/readyz`)).status).toBe(503);
    const late = new AbortController();
    const id3 = rid("drain-r3");
    const r3 = run(
      pool,
      { id: id3, model, prompt: textPrompt("Late"), sampling: { max_tokens: 4 } },
      { signal: late.signal },
    );

    const [done1, done2] = await Promise.all([r1, r2]);
    for (const d of [done1, done2]) {
      expect(d.error).toBeUndefined();
      expect(d.final?.finish_reason).toBe("length");
      expect(d.final?.usage.completion_tokens).toBe(120);
    }
    expect(await w.exited).toBe(0);
    expect(w.logs.some((l) => l.msg === "admitted" && l.request_id === id3)).toBe(false);
    expect((await consumerState(pool)).pending).toBe(1); // still queued for the next worker
    late.abort();
    expect((await r3).error).toBeInstanceOf(CancelledError);
    expect((await r3).events).toHaveLength(0);
  });

  test("chat prompts are rendered by the worker with the model's template; a rejected conversation is a bad_request", async () => {
    const chat = (messages: { role: "system" | "user" | "assistant"; content: string }[]) =>
      run(IN_PROC_POOL, {
        id: rid("chat"),
        model,
        prompt: { type: "chat", messages },
        sampling: { temperature: 0, max_tokens: 3 },
      });
    const ok = await chat([
      { role: "system", content: "Be brief." },
      { role: "user", content: "Hello" },
    ]);
    expect(ok.error).toBeUndefined();
    // [INST] <<SYS>> ... the rendered template is far longer than the two messages' words.
    expect(ok.final?.usage.prompt_tokens).toBeGreaterThan(15);
    const bad = await chat([
      { role: "user", content: "Hello" },
      { role: "user", content: "Hello again" },
    ]);
    expect(bad.error).toMatchObject({ code: "bad_request", status: 400 });
  });

  test("a prompt that leaves no room in the context is a context_length_exceeded error, not a crash", async () => {
    const long = await run(IN_PROC_POOL, {
      id: rid("long"),
      model,
      prompt: { type: "tokens", token_ids: Array.from({ length: 300 }, () => 100) },
      sampling: { temperature: 0, max_tokens: 3 },
    });
    expect(long.error).toMatchObject({ code: "context_length_exceeded", status: 400 });
    expect(long.error?.message).toMatch(/maximum context length is 256 tokens/);
  });

  test("workers publish load reports on the pool's load subject", async () => {
    const sub = nc.subscribe(poolNames(IN_PROC_POOL).load, { max: 1, timeout: 5000 });
    for await (const m of sub) {
      const report = parseLoadReport(m.data);
      expect(report.ok).toBe(true);
      expect(report.ok && report.value).toMatchObject({
        worker_id: "inproc-1",
        pool: IN_PROC_POOL,
        model,
        max_num_seqs: 4,
        draining: false,
        kv_blocks_total: host.config.numBlocks,
      });
    }
  });

  test("an addressed request is accepted at once and runs like a pulled one; a malformed one is refused", async () => {
    const sub = nc.subscribe(poolNames(IN_PROC_POOL).load, { max: 1, timeout: 5000 });
    let subject = "";
    for await (const m of sub) {
      const report = parseLoadReport(m.data);
      subject = report.ok ? (report.value.direct_subject ?? "") : "";
    }
    expect(subject).toMatch(/^llama\.pool\.inproc\.worker\.[a-z0-9]+$/);
    const id = rid("direct");
    const replyTo = createInbox();
    const events: TokenEvent[] = [];
    const done = new Promise<void>((resolve) => {
      nc.subscribe(replyTo, {
        callback: (_err, msg) => {
          const p = parseReplyMessage(msg.data);
          if (p.ok && p.value.type !== "claim") events.push(p.value);
          if (p.ok && (p.value.type === "final" || p.value.type === "error")) resolve();
        },
      });
    });
    const message = {
      v: PROTOCOL_VERSION,
      id,
      model,
      prompt: { type: "text", text: "Once upon a time" },
      sampling: { temperature: 0, max_tokens: 5 },
      deadline: Date.now() + 30_000,
      reply_to: replyTo,
    };
    const reply = await nc.request(subject, JSON.stringify(message), { timeout: 2000 });
    expect(DirectReplySchema.parse(reply.json())).toEqual({ v: PROTOCOL_VERSION, id, accepted: true });
    await done;
    expect(events.map((e) => e.type)).toEqual(["start", "delta", "delta", "delta", "delta", "delta", "final"]);
    const refused = await nc.request(subject, "not json", { timeout: 2000 });
    expect(DirectReplySchema.parse(refused.json()).accepted).toBe(false);
  });

  test("cancel mid-stream frees the sequence's KV blocks within a step", async () => {
    const id = rid("cancel");
    const raw: TokenEvent[] = [];
    const spy = nc.subscribe("_INBOX.>", {
      callback: (_err, msg) => {
        const p = parseReplyMessage(msg.data);
        if (p.ok && p.value.type !== "claim" && p.value.id === id) raw.push(p.value);
      },
    });
    let seenAtCancel = 0;
    for await (const ev of dispatcher.submit(IN_PROC_POOL, { id, model, prompt: textPrompt("Once"), sampling: LONG })) {
      // Once the engine's stats (pushed every 100 ms) show the sequence's blocks, leave the loop: that cancels.
      if (ev.type === "delta" && ++seenAtCancel >= 10 && host.stats().kvBlocksUsed > 0) break;
    }
    expect(seenAtCancel).toBeLessThan(150);
    const cancelledAt = Date.now();
    const stats = await until(
      () => host.stats(),
      (s) => s.kvBlocksUsed === 0 && s.running === 0,
      2000,
    );
    expect(stats.kvBlocksUsed).toBe(0);
    expect(Date.now() - cancelledAt).toBeLessThan(500);
    const final = await until(
      () => raw.find((e) => e.type === "final"),
      (e) => e !== undefined,
      1000,
    );
    spy.unsubscribe();
    expect(final).toMatchObject({ type: "final", finish_reason: "abort" });
    // Tokens generated after the cancel: the few in flight between engine, worker and us, not the other ~190.
    const generated = final?.type === "final" ? final.usage.completion_tokens : Number.NaN;
    expect(generated - seenAtCancel).toBeLessThan(15);
  });

  test("malformed, oversized and wrong-version messages get error events and never crash the worker", async () => {
    const { requests } = poolNames(IN_PROC_POOL);
    /** Publishes `body` on the request subject and returns the first error event on `replyTo`, if any. */
    const ask = async (body: Uint8Array | string, replyTo: string): Promise<TokenEvent | undefined> => {
      const sub = nc.subscribe(replyTo, { timeout: 3000 });
      nc.publish(requests, body);
      try {
        for await (const m of sub) {
          const p = parseReplyMessage(m.data);
          if (p.ok && p.value.type === "error") return p.value;
        }
      } catch {
        // timeout
      } finally {
        sub.unsubscribe();
      }
      return undefined;
    };
    const valid = (replyTo: string) => ({
      v: PROTOCOL_VERSION,
      id: rid("bad"),
      model,
      prompt: { type: "text", text: "Hi" },
      sampling: { max_tokens: 2 },
      deadline: Date.now() + 10_000,
      reply_to: replyTo,
    });
    const cases: [string, (r: string) => Uint8Array | string, string][] = [
      ["missing fields", (r) => JSON.stringify({ v: 1, id: "x1", reply_to: r }), "bad_request"],
      ["wrong types", (r) => JSON.stringify({ ...valid(r), sampling: { temperature: "hot" } }), "bad_request"],
      ["wrong version", (r) => JSON.stringify({ ...valid(r), v: 99 }), "unsupported_version"],
      ["expired deadline", (r) => JSON.stringify({ ...valid(r), deadline: Date.now() - 1 }), "deadline_exceeded"],
      ["unknown model", (r) => JSON.stringify({ ...valid(r), model: "gpt-9" }), "model_not_found"],
      [
        "invalid sampling for the engine",
        (r) => JSON.stringify({ ...valid(r), sampling: { top_k: 10 ** 9, logit_bias: { "99999999": 1 } } }),
        "bad_request",
      ],
      [
        "oversized",
        (r) => JSON.stringify({ ...valid(r), prompt: { type: "text", text: "x".repeat(MAX_REQUEST_BYTES) } }),
        "too_large",
      ],
    ];
    for (const [name, body, code] of cases) {
      const inbox = createInbox();
      const ev = await ask(body(inbox), inbox);
      expect(ev, name).toMatchObject({ type: "error", code });
    }
    // No reply subject at all: nothing to answer, and nothing breaks.
    nc.publish(requests, "not json");
    nc.publish(requests, new Uint8Array([0xff, 0xfe, 0x00]));
    nc.publish(requests, JSON.stringify([1, 2, 3]));
    const ok = await run(IN_PROC_POOL, {
      id: rid("after-garbage"),
      model,
      prompt: textPrompt("Hi"),
      sampling: { max_tokens: 3 },
    });
    expect(ok.error).toBeUndefined();
    expect(ok.final?.usage.completion_tokens).toBe(3);
    expect(
      await until(
        () => consumerState(IN_PROC_POOL),
        (s) => s.pending + s.ackPending === 0,
        2000,
      ),
    ).toEqual({
      pending: 0,
      ackPending: 0,
    });
  });

  test("a request pulled by a worker that died before admitting it is served by another, seen once", async () => {
    const pool = "predeath";
    await ensurePool(await jetstreamManager(nc), pool, { ackWaitMs: 1500 });
    const id = rid("predeath");
    const pending = run(pool, { id, model, prompt: textPrompt("Hello"), sampling: { temperature: 0, max_tokens: 4 } });
    // A worker that pulls the request and dies before admitting it: no ack, no start.
    const { stream, consumer } = poolNames(pool);
    const pulled = await (await jetstream(nc).consumers.get(stream, consumer)).next({ expires: 5000 });
    expect(pulled?.info.deliveryCount).toBe(1);

    const lines: Record<string, unknown>[] = [];
    const logger = pino({ level: "info" }, { write: (s: string) => void lines.push(JSON.parse(s)) });
    const other = await NatsWorker.start({ servers: nats.url, pool, workerId: "predeath-b", engine: host, logger });
    try {
      const r = await pending;
      expect(r.error).toBeUndefined();
      expect(r.events.filter((e) => e.type === "start")).toEqual([
        expect.objectContaining({ worker_id: "predeath-b" }),
      ]);
      expect(r.final?.usage.completion_tokens).toBe(4);
      // It came back after ack_wait, and the requester granted the claim (it had seen no start).
      expect(lines.find((l) => l.msg === "admitted" && l.request_id === id)).toMatchObject({ deliveries: 2 });
    } finally {
      await other?.close();
    }
  });

  test("restart nats-server while requests flow: new requests succeed within 5 s of its return; none hang", async () => {
    interface Done {
      submittedAt: number;
      endedAt: number;
      ok: boolean;
    }
    const done: Done[] = [];
    let flowing = true;
    const loop = async () => {
      while (flowing) {
        const submittedAt = Date.now();
        const r = await run(IN_PROC_POOL, {
          id: rid("flow"),
          model,
          prompt: textPrompt("Flow"),
          sampling: { temperature: 0, max_tokens: 24, ignore_eos: true },
          deadline: Date.now() + 8000,
        });
        done.push({ submittedAt, endedAt: Date.now(), ok: r.final?.usage.completion_tokens === 24 });
        if (!r.final) await new Promise((res) => setTimeout(res, 100));
      }
    };
    const loops = [loop(), loop()];
    await until(
      () => done.filter((d) => d.ok).length,
      (n) => n >= 4,
      10_000,
    );

    await nats.restart({ downMs: 1000 });
    const backAt = Date.now();
    const firstOk = await until(
      () => done.find((d) => d.ok && d.submittedAt >= backAt),
      (d) => d !== undefined,
      8000,
    );
    flowing = false;
    await Promise.all(loops);
    expect(firstOk, "a request submitted after the restart succeeded").toBeDefined();
    expect(firstOk!.endedAt - backAt).toBeLessThan(5000);
    // None hung: every request ended within its deadline plus the heartbeat timeout.
    expect(Math.max(...done.map((d) => d.endedAt - d.submittedAt))).toBeLessThan(11_000);
    expect(inproc.connected).toBe(true);
  });
});
