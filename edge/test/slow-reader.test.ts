// Clients that stop reading a stream: the events the workers keep pushing wait in a bounded buffer, and a reader
// that takes nothing for the configured time (or lets the buffer overflow) has its request cancelled at the
// worker, its usage settled and its slot freed. In this isolate and through a real dispatch shard over NATS.
import { env } from "cloudflare:workers";
import { afterEach, describe, expect, inject, it } from "vitest";
import { parseGatewayConfig } from "../src/config.ts";
import { FakeWorker } from "./fake-worker.ts";
import {
  chat,
  eventually,
  keyStore,
  makeApp,
  newKey,
  openReservations,
  post,
  ScriptedBackend,
  shardedApp,
  testConfig,
} from "./helpers.ts";

const workers: FakeWorker[] = [];
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.stop()));
});

/** Reads `chunks` chunks of a response, then stops reading without cancelling: a client that stalls. */
async function stallAfter(res: Response, chunks: number): Promise<ReadableStreamDefaultReader<Uint8Array>> {
  const reader = res.body!.getReader();
  for (let i = 0; i < chunks; i++) await reader.read();
  return reader;
}

describe("slow readers", () => {
  it("cancels at the worker a client that reads nothing for idle_reader_timeout_ms, and settles its usage", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: Array(2000).fill("t"), delayMs: 2 }));
    const { app } = makeApp(backend, { ...testConfig, idle_reader_timeout_ms: 300 });
    const { key, hash } = await newKey({ max_concurrent: 1 });
    const res = await app.request(post("/v1/chat/completions", key, chat({ stream: true })));
    const reader = await stallAfter(res, 3);
    const sub = backend.submissions[0]!;
    await sub.done;
    expect(sub.aborted).toBe(true); // cancelled, not run to its 2000 tokens
    await eventually(async () => (await openReservations(hash)) === 0);
    const report = await keyStore().usage({ hash }, "2000-01-01", "2999-12-31");
    expect(report!.totals.requests).toBe(1);
    expect(report!.totals.completion_tokens).toBeGreaterThan(0);
    expect(report!.totals.completion_tokens).toBeLessThan(2000);
    // A client that comes back finds the stream ended by an error, not the rest of the story.
    let rest = "";
    for (let r = await reader.read(); !r.done; r = await reader.read()) rest += new TextDecoder().decode(r.value);
    expect(rest).not.toContain("[DONE]");
    expect(rest).toContain('"error"');
  });

  it("cancels a client that leaves more than max_unread_bytes unread, before the idle timeout", async () => {
    const kb = "x".repeat(1024);
    const backend = new ScriptedBackend(() => ({ tokens: Array(1000).fill(kb), delayMs: 1 }));
    const { app } = makeApp(backend, {
      ...testConfig,
      idle_reader_timeout_ms: 60_000,
      max_unread_bytes: 64 * 1024,
    });
    const { key, hash } = await newKey();
    const res = await app.request(post("/v1/chat/completions", key, chat({ stream: true })));
    await stallAfter(res, 2);
    const sub = backend.submissions[0]!;
    await sub.done;
    expect(sub.aborted).toBe(true);
    await eventually(async () => (await openReservations(hash)) === 0);
  });

  it("leaves a client that keeps reading alone, however long the answer", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: Array(300).fill("t"), delayMs: 2 }));
    const { app } = makeApp(backend, { ...testConfig, idle_reader_timeout_ms: 200 });
    const { key } = await newKey();
    const text = await (await app.request(post("/v1/chat/completions", key, chat({ stream: true })))).text();
    expect(text).toContain("[DONE]");
    expect(backend.submissions[0]!.aborted).toBe(false);
  });

  it("through a dispatch shard: the stall reaches the shard, which cancels at the worker", async () => {
    const worker = await FakeWorker.start({
      url: inject("natsWsUrl"),
      pool: "default",
      workerId: "stall-w",
      model: "stories15m-random",
      direct: false,
      delayMs: 5,
      tokens: () => Array(3000).fill("t"),
    });
    workers.push(worker);
    const { key, hash } = await newKey();
    const { app, keys } = shardedApp({ ...parseGatewayConfig(env.GATEWAY_CONFIG), idle_reader_timeout_ms: 500 });
    const body = { model: "stories15m-random", messages: [{ role: "user", content: "stall" }], stream: true };
    const res = await app.request(post("/v1/chat/completions", key, body));
    await stallAfter(res, 3);
    await eventually(() => worker.cancelled.size === 1, 10_000);
    await eventually(async () => (await openReservations(hash)) === 0);
    const report = await keys.usage({ hash }, "2000-01-01", "2999-12-31");
    expect(report!.totals.completion_tokens).toBeLessThan(3000);
  });
});
