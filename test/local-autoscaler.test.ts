/**
 * The local autoscaler on a real nats-server with real workers, from zero and back:
 *   1. a pool at zero workers: one request arrives (lag 1), a worker starts and serves it, and the pool drains back
 *      to zero once the scale-down window has passed, not before;
 *   2. a burst queued at zero starts two workers; once both report load, a second burst is shared by them;
 *   3. with the lag below one worker's worth, the newest worker is drained while it streams, and every stream
 *      completes; then the pool drains to zero.
 *
 * The test drives the autoscaler's polls itself, on its own clock (the policy's interval is an hour, so the timer
 * never fires): each decision happens at a point the test chose, and waiting out a window takes no real time.
 * Everything the assertions depend on is an event the test waited for (a scale event, a load report, a start),
 * never a sleep.
 */
import { randomUUID } from "node:crypto";
import {
  type DispatchEvent,
  Dispatcher,
  type LoadReport,
  parseLoadReport,
  poolNames,
  type SubmitRequest,
} from "@llama-edge/shared";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, expect, it } from "vitest";
import { ensureDefaultModel } from "../gpu-worker/src/model/default-model.ts";
import {
  type AutoscalerEvent,
  LocalAutoscaler,
  readScalePolicy,
  type ScalePolicy,
  spawnWorker,
} from "../infra/local/autoscaler.ts";
import { startTestNats, type TestNats } from "./helpers/nats-server.ts";

const POOL = "autoscale";
/** Sequences one worker runs at once; the lag threshold is twice that, so two full workers want only one. */
const MAX_NUM_SEQS = 4;
let nats: TestNats;
let nc: NatsConnection;
let scaler: LocalAutoscaler;
let policy: ScalePolicy;
const events: AutoscalerEvent[] = [];
/** Each worker's first load report: it is pulling from then on. */
const firstReports = new Map<string, LoadReport>();
let clock = 0;

/** One autoscaler poll, `ms` after the previous one on the test's clock. */
async function tick(ms = 100): Promise<void> {
  clock += ms;
  await scaler.poll(clock);
}

async function until(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

beforeAll(async () => {
  nats = await startTestNats();
  await ensureDefaultModel("default", { quiet: true });
  nc = await connect({ servers: nats.url });
  nc.subscribe(poolNames(POOL).load, {
    callback: (err, msg) => {
      const r = err ? null : parseLoadReport(msg.data);
      if (r?.ok && !firstReports.has(r.value.worker_id)) firstReports.set(r.value.worker_id, r.value);
    },
  });
  policy = readScalePolicy(undefined, {
    minReplicas: 0,
    maxReplicas: 2,
    lagThreshold: 2 * MAX_NUM_SEQS,
    activationLagThreshold: 0,
    pollingIntervalMs: 3_600_000,
    scaleUpPods: 2,
    scaleUpPeriodMs: 1000,
    scaleDownWindowMs: 10_000,
    scaleDownPods: 1,
    scaleDownPeriodMs: 1000,
  });
  scaler = new LocalAutoscaler({
    pool: POOL,
    nc,
    policy,
    startWorker: (workerId) =>
      spawnWorker({
        workerId,
        pool: POOL,
        natsUrl: nats.url,
        maxNumSeqs: MAX_NUM_SEQS,
        extra: ["--log-level", "warn"],
      }),
    onEvent: (e) => events.push(e),
  });
  await scaler.start();
});

afterAll(async () => {
  await scaler?.stop();
  await nc?.close();
  await nats?.stop();
});

interface Stream {
  workerId?: string;
  final?: Extract<DispatchEvent, { type: "final" }>;
  tokens: number;
  error?: Error;
  done: Promise<Stream>;
}

/** Submits a request and follows its events; `done` resolves when it ends, however it ends. */
function submit(dispatcher: Dispatcher, maxTokens: number): Stream {
  const req: SubmitRequest = {
    id: randomUUID(),
    model: "stories15m-random",
    prompt: { type: "text", text: `Once upon a time ${randomUUID()}` },
    sampling: { temperature: 0, max_tokens: maxTokens, ignore_eos: true },
    deadline: Date.now() + 120_000,
  };
  const s = { tokens: 0 } as Stream;
  s.done = (async () => {
    try {
      for await (const ev of dispatcher.submit(POOL, req)) {
        if (ev.type === "start") s.workerId = ev.worker_id;
        if (ev.type === "delta") s.tokens += ev.token_ids.length;
        if (ev.type === "final") s.final = ev;
      }
    } catch (e) {
      s.error = e as Error;
    }
    return s;
  })();
  return s;
}

const completed = (s: Stream, tokens: number) =>
  s.error === undefined && s.final?.finish_reason === "length" && s.tokens === tokens;

const exitOf = (workerId: string) => events.find((e) => e.type === "worker-exit" && e.workerId === workerId);

/** Polls past the scale-down window and waits for the drained worker to exit; returns its id. */
async function drainOne(): Promise<string> {
  const before = events.filter((e) => e.type === "scale-down").length;
  await tick(policy.scaleDownWindowMs + 1);
  const down = events.filter((e) => e.type === "scale-down")[before];
  expect(down, "a worker was drained once the window had passed").toBeDefined();
  const id = down?.workerId ?? "";
  await until(`${id} to exit`, () => exitOf(id) !== undefined);
  expect(exitOf(id)?.code, `${id} exits cleanly after its drain`).toBe(0);
  return id;
}

it("scales a pool from zero to serve a request, and back to zero after the window", async () => {
  const dispatcher = new Dispatcher(nc, { defaultDeadlineMs: 120_000 });
  await tick();
  expect(scaler.replicas, "min 0: no worker while nothing is queued").toBe(0);

  // A request arrives at a pool with no worker: it waits in the queue, and a lag of 1 activates the pool.
  const first = submit(dispatcher, 8);
  await until("the request to be queued", async () => (await scaler.lag()) === 1);
  await tick();
  const up = events.find((e) => e.type === "scale-up");
  expect(up).toMatchObject({ lag: 1, replicas: 1 });
  await first.done;
  expect(completed(first, 8), first.error?.message).toBe(true);
  expect(first.workerId).toBe(up?.workerId);

  // Idle now, but the window still remembers a worker was wanted: it stays until the window has passed.
  await tick();
  expect(scaler.replicas, "no scale-down inside the window").toBe(1);
  expect(await drainOne()).toBe(up?.workerId);
  expect(scaler.replicas).toBe(0);
  expect(scaler.workers.size).toBe(0);
}, 180_000);

it("starts workers for a burst, and a new worker shares the next burst once it reports load", async () => {
  const dispatcher = new Dispatcher(nc, { defaultDeadlineMs: 120_000 });
  // Queued at zero workers: the lag is the whole burst, whatever the workers' speed.
  const burst = Array.from({ length: 16 }, () => submit(dispatcher, 32));
  await until("the burst to be queued", async () => (await scaler.lag()) === 16);
  await tick();
  const ups = events.filter((e) => e.type === "scale-up").slice(-2);
  expect(ups.map((e) => e.lag)).toEqual([16, 16]);
  expect(scaler.replicas).toBe(2);
  const workerIds = ups.map((e) => e.workerId ?? "");
  await until("both new workers' first load reports", () => workerIds.every((id) => firstReports.has(id)));
  const done = await Promise.all(burst.map((s) => s.done));
  expect(done.every((s) => completed(s, 32))).toBe(true);

  // Both workers are pulling now. Each runs at most MAX_NUM_SEQS at a time, so neither can take the whole burst.
  const shared = await Promise.all(Array.from({ length: 16 }, () => submit(dispatcher, 64).done));
  expect(shared.every((s) => completed(s, 64))).toBe(true);
  for (const id of workerIds) {
    expect(
      shared.some((s) => s.workerId === id),
      `${id} served part of the burst`,
    ).toBe(true);
  }
}, 240_000);

it("drains the newest worker while it streams without dropping a stream, then drains to zero", async () => {
  const dispatcher = new Dispatcher(nc, { defaultDeadlineMs: 120_000 });
  expect(scaler.replicas).toBe(2);
  // Two workers' worth of long streams: each worker holds MAX_NUM_SEQS of them.
  const streams = Array.from({ length: 2 * MAX_NUM_SEQS }, () => submit(dispatcher, 200));
  await until("every stream to start", () => streams.every((s) => s.workerId !== undefined));
  const newest = [...scaler.workers.keys()].at(-1);
  const onNewest = streams.filter((s) => s.workerId === newest);
  expect(onNewest.length, "the newest worker is streaming").toBeGreaterThan(0);

  // A lag of 8 wants one worker: past the window, the newest is drained while its streams run.
  await tick(policy.scaleDownWindowMs + 1);
  const down = events.filter((e) => e.type === "scale-down").at(-1);
  expect(down).toMatchObject({ workerId: newest, lag: 2 * MAX_NUM_SEQS, replicas: 1 });
  const done = await Promise.all(streams.map((s) => s.done));
  expect(
    done.every((s) => completed(s, 200)),
    "every stream completes, the drained worker's too",
  ).toBe(true);
  await until(`${newest} to exit`, () => exitOf(newest ?? "") !== undefined);
  expect(exitOf(newest ?? "")?.code).toBe(0);

  // Idle: the last worker goes after the window.
  await drainOne();
  expect(scaler.replicas).toBe(0);
  expect(scaler.workers.size).toBe(0);
}, 240_000);
