/**
 * The local autoscaler on a real nats-server with real workers: a burst builds consumer lag and a second worker
 * starts and serves; when the lag falls, the newest worker is drained with SIGTERM and every stream in flight on it
 * completes. The policy is the cluster's ScaledObject with time compressed (KEDA waits minutes).
 */
import { randomUUID } from "node:crypto";
import { type DispatchEvent, Dispatcher, type SubmitRequest } from "@llama-edge/shared";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, expect, it } from "vitest";
import { ensureDefaultModel } from "../gpu-worker/src/model/default-model.ts";
import { type AutoscalerEvent, LocalAutoscaler, readScalePolicy, spawnWorker } from "../infra/local/autoscaler.ts";
import { startTestNats, type TestNats } from "./helpers/nats-server.ts";

const POOL = "autoscale";
let nats: TestNats;
let nc: NatsConnection;
let scaler: LocalAutoscaler;
const events: (AutoscalerEvent & { t: number })[] = [];

beforeAll(async () => {
  nats = await startTestNats();
  await ensureDefaultModel("default", { quiet: true });
  nc = await connect({ servers: nats.url });
  const policy = readScalePolicy(undefined, {
    minReplicas: 1,
    maxReplicas: 2,
    lagThreshold: 4,
    pollingIntervalMs: 200,
    scaleUpPods: 1,
    scaleUpPeriodMs: 200,
    scaleDownWindowMs: 800,
    scaleDownPeriodMs: 200,
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
        maxNumSeqs: policy.lagThreshold,
        extra: ["--log-level", "warn"],
      }),
    onEvent: (e) => events.push({ ...e, t: Date.now() }),
  });
  await scaler.start();
});

afterAll(async () => {
  await scaler?.stop();
  await nc?.close();
  await nats?.stop();
});

interface Outcome {
  workerId?: string;
  final?: Extract<DispatchEvent, { type: "final" }>;
  tokens: number;
  error?: Error;
}

async function run(dispatcher: Dispatcher, req: SubmitRequest): Promise<Outcome> {
  const out: Outcome = { tokens: 0 };
  try {
    for await (const ev of dispatcher.submit(POOL, req)) {
      if (ev.type === "start") out.workerId = ev.worker_id;
      if (ev.type === "delta") out.tokens += ev.token_ids.length;
      if (ev.type === "final") out.final = ev;
    }
  } catch (e) {
    out.error = e as Error;
  }
  return out;
}

const request = (maxTokens: number): SubmitRequest => ({
  id: randomUUID(),
  model: "stories15m-random",
  prompt: { type: "text", text: `Once upon a time ${randomUUID()}` },
  sampling: { temperature: 0, max_tokens: maxTokens, ignore_eos: true },
  deadline: Date.now() + 60_000,
});

it("adds a worker when lag builds, and drains one without dropping its streams when lag falls", async () => {
  const dispatcher = new Dispatcher(nc, { defaultDeadlineMs: 60_000 });
  // the first worker comes up and serves
  const first = await run(dispatcher, request(4));
  expect(first.error).toBeUndefined();
  expect(scaler.replicas).toBe(1);

  // a burst: 4 running + 12 queued on one worker of max_num_seqs 4 → lag 16 → KEDA wants 2 (the max)
  const burst = await Promise.all(Array.from({ length: 16 }, () => run(dispatcher, request(120))));
  expect(burst.every((o) => o.error === undefined && o.final?.finish_reason === "length")).toBe(true);
  const up = events.find((e) => e.type === "scale-up" && e.workerId !== `${POOL}-local-0`);
  expect(up, "a second worker was started").toBeDefined();
  expect(up?.lag).toBeGreaterThan(4);
  const servers = new Set(burst.map((o) => o.workerId));
  expect(servers.has(up?.workerId), "the new worker served part of the burst").toBe(true);

  // lag falls to what one worker holds; streams keep running while the newest worker is drained
  const streams = await Promise.all(Array.from({ length: 4 }, () => run(dispatcher, request(200))));
  const down = events.find((e) => e.type === "scale-down");
  expect(down, "a worker was drained").toBeDefined();
  expect(down?.lag, "with requests in flight in the pool").toBeGreaterThan(0);
  expect(streams.every((o) => o.error === undefined && o.final?.finish_reason === "length" && o.tokens === 200)).toBe(
    true,
  );
  // the drained worker exited cleanly (0) after finishing what it held
  const deadline = Date.now() + 30_000;
  while (!events.some((e) => e.type === "worker-exit" && e.workerId === down?.workerId) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 100));
  }
  expect(events.find((e) => e.type === "worker-exit" && e.workerId === down?.workerId)?.code).toBe(0);
  expect(scaler.replicas).toBe(1);
}, 180_000);
