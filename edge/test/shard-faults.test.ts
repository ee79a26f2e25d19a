// A dispatch shard (the Durable Object holding the NATS connection and running jobs) dies mid-stream: reset with
// the real Durable Objects, a real nats-server and a worker on it. Tokens delivered are charged, the concurrency
// slot comes back within seconds, and the workers stop generating for nobody.
import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterEach, describe, expect, inject, it } from "vitest";
import { decodeEvents, type Job } from "../src/dispatch/job.ts";
import { FakeWorker } from "./fake-worker.ts";
import { eventually, keyStore, newKey, openReservations, post, shardedApp } from "./helpers.ts";

const url = inject("natsWsUrl");
const pool = "default";
const model = "stories15m-random";
const workers: FakeWorker[] = [];
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.stop()));
});

/** Resets one Durable Object, as an eviction or a crash would: its memory and in-flight work are gone. */
async function resetObject(stub: DurableObjectStub): Promise<void> {
  await runInDurableObject(stub, (_, state) => state.abort("reset by the test")).catch(() => {});
}

const slowWorker = (workerId: string) =>
  FakeWorker.start({ url, pool, workerId, model, direct: false, delayMs: 30, tokens: () => Array(300).fill("t") });

describe("a dispatch shard dying mid-stream", () => {
  it("with the client still there: charges what was delivered, frees the slot at once, cancels at the worker", async () => {
    const worker = await slowWorker("fault-w1");
    workers.push(worker);
    const { key, hash } = await newKey({ max_concurrent: 1 });
    const { app, keys } = shardedApp(undefined, 1);
    const body = { model, messages: [{ role: "user", content: "a long story" }], stream: true };
    const res = await app.request(post("/v1/chat/completions", key, body));
    expect(res.status).toBe(200);
    const reader = res.body!.getReader();
    const decoder = new TextDecoder();
    let text = "";
    while ((text.match(/"content":"t"/g) ?? []).length < 5) text += decoder.decode((await reader.read()).value);

    await resetObject(env.DISPATCH.get(env.DISPATCH.idFromName("shard-0")));

    for (;;) {
      const r = await reader.read();
      if (r.done) break;
      text += decoder.decode(r.value);
    }
    const delivered = (text.match(/"content":"t"/g) ?? []).length;
    expect(text).toContain('"code":"bad_gateway"');
    expect(text).not.toContain("[DONE]");
    // The slot is back at once: the gateway settled what it had relayed.
    expect(await openReservations(hash)).toBe(0);
    const report = await keys.usage({ hash }, "2000-01-01", "2999-12-31");
    expect(report!.totals).toMatchObject({ requests: 1, completion_tokens: delivered });
    // The worker was told to stop (by a fresh shard instance: the old one, and its connection, are gone).
    await eventually(() => worker.cancelled.size > 0);
    expect([...worker.cancelled].some((id) => id.startsWith(worker.received[0]!.id))).toBe(true);
  });

  it("with the client gone too: the lease lapses within seconds and the last renewal's usage is charged", async () => {
    workers.push(await slowWorker("fault-w2"));
    const { hash } = await newKey({ max_concurrent: 1 });
    const keys = keyStore();
    const leaseMs = 1500;
    const now = Date.now();
    const admitted = await keys.admit(hash, {
      model,
      tokens: 100,
      leaseUntil: now + leaseMs,
      expiresAt: now + 120_000,
    });
    if (!admitted.ok) throw new Error(admitted.message);
    const job: Job = {
      id: `chatcmpl-lease${now}`,
      keyHash: hash,
      reservationId: admitted.reservationId,
      model,
      pools: [pool],
      prompts: [{ type: "chat", messages: [{ role: "user", content: "hello" }], add_generation_prompt: true }],
      n: 1,
      sampling: {},
      deadline: now + 60_000,
      estimatedPromptTokens: [5],
      leaseMs,
    };
    // The shard runs the job as the gateway would have it; nobody will be left to settle it.
    const stub = env.DISPATCH.get(env.DISPATCH.idFromName("shard-lease-test"));
    const events = decodeEvents((await stub.run(job)) as ReadableStream<Uint8Array>, new AbortController().signal);
    let seen = 0;
    const started = Date.now();
    for await (const ev of events) {
      if (ev.type === "delta") seen++;
      if (Date.now() - started > leaseMs) break; // long enough for a renewal with tokens in it
    }
    await resetObject(stub);

    // Within seconds (one lease after the last renewal), not at the reservation's expiry two minutes out.
    await eventually(async () => (await openReservations(hash)) === 0, 10_000);
    const again = await keys.admit(hash, { model, tokens: 1, expiresAt: Date.now() + 60_000 });
    expect(again.ok).toBe(true); // the slot came back
    const report = await keys.usage({ hash }, "2000-01-01", "2999-12-31");
    expect(report!.totals.requests).toBe(1);
    expect(report!.totals.completion_tokens).toBeGreaterThan(0);
    expect(report!.totals.completion_tokens).toBeLessThanOrEqual(seen + 40); // what the worker had made by then
  });
});
