// The dispatch path against a real nats-server (started by global-setup.ts): the shared Dispatcher's queue,
// addressed requests, prefix affinity, and the dispatch shard Durable Object behind the real Workers entry.
import { exports } from "cloudflare:workers";
import { afterEach, describe, expect, inject, it, vi } from "vitest";
import { parseGatewayConfig } from "../src/config.ts";
import { PrefixRouter, WorkerTable } from "../src/dispatch/affinity.ts";
import { NatsBackend } from "../src/dispatch/nats-backend.ts";
import { NatsLink, plaintextCredentialsProblem } from "../src/dispatch/nats-link.ts";
import { CACHED_TOKENS, FakeWorker } from "./fake-worker.ts";
import { bearer, eventually, newKey, openReservations, post, shardedApp, sseEvents } from "./helpers.ts";

const url = inject("natsWsUrl");
const workers: FakeWorker[] = [];
const links: NatsLink[] = [];
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.stop()));
  await Promise.all(links.splice(0).map((l) => l.close()));
});

async function backend() {
  const table = new WorkerTable();
  const link = new NatsLink({ url, onLoadReport: (r, direct) => table.update(r, direct) });
  links.push(link);
  await link.get();
  return { backend: new NatsBackend(link, new PrefixRouter(table)), table };
}

async function collect(it: AsyncIterable<{ type: string }>) {
  const out = [];
  for await (const ev of it) out.push(ev);
  return out;
}

const signal = () => new AbortController().signal;
const chatPrompt = (system: string, user: string) => ({
  type: "chat" as const,
  messages: [
    { role: "system" as const, content: system },
    { role: "user" as const, content: user },
  ],
});

describe("NatsBackend", () => {
  it("queues a request through the pool's JetStream consumer", async () => {
    workers.push(await FakeWorker.start({ url, pool: "nb-queue", workerId: "wq", model: "m", direct: false }));
    const { backend: b } = await backend();
    const events = await collect(
      b.submit("nb-queue", { id: "req-q-1", model: "m", prompt: { type: "text", text: "hi" } }, { signal: signal() }),
    );
    expect(events.map((e) => e.type)).toEqual(["start", "delta", "delta", "delta", "final"]);
    expect(workers[0]!.received).toEqual([{ id: "req-q-1", via: "queue" }]);
  });

  it("sends a shared system prompt to the worker that cached it, which reports cached tokens", async () => {
    const pool = "nb-affinity";
    const a = await FakeWorker.start({ url, pool, workerId: "wa", model: "m" });
    const b = await FakeWorker.start({ url, pool, workerId: "wb", model: "m" });
    workers.push(a, b);
    const { backend: be, table } = await backend();
    await eventually(() => table.inPool(pool).length === 2);
    const system = "You are a helpful assistant. ".repeat(20);
    const first = await collect(
      be.submit(pool, { id: "aff-1", model: "m", prompt: chatPrompt(system, "Q1") }, { signal: signal() }),
    );
    const firstWorker = (first[0] as unknown as { worker_id: string }).worker_id;
    for (let i = 2; i <= 5; i++) {
      const evs = await collect(
        be.submit(pool, { id: `aff-${i}`, model: "m", prompt: chatPrompt(system, `Q${i}`) }, { signal: signal() }),
      );
      expect((evs[0] as unknown as { worker_id: string }).worker_id).toBe(firstWorker);
      expect((evs.at(-1) as unknown as { usage: { cached_tokens: number } }).usage.cached_tokens).toBe(CACHED_TOKENS);
    }
    const chosen = firstWorker === "wa" ? a : b;
    expect(chosen.received.map((r) => r.via)).toEqual(["queue", "direct", "direct", "direct", "direct"]);
  });

  it("falls back to the queue, under a new id, when the worker refuses", async () => {
    const pool = "nb-refuse";
    const w = await FakeWorker.start({ url, pool, workerId: "wr", model: "m", refuseDirect: true });
    workers.push(w);
    const { backend: be, table } = await backend();
    await eventually(() => table.inPool(pool).length === 1);
    await collect(be.submit(pool, { id: "ref-1", model: "m", prompt: chatPrompt("S", "1") }, { signal: signal() }));
    const evs = await collect(
      be.submit(pool, { id: "ref-2", model: "m", prompt: chatPrompt("S", "2") }, { signal: signal() }),
    );
    expect(evs.at(-1)?.type).toBe("final");
    expect(w.received).toEqual([
      { id: "ref-1", via: "queue" },
      { id: "ref-2-q", via: "queue" },
    ]);
    expect(w.cancelled.has("ref-2")).toBe(true); // in case its acceptance had arrived late
  });
});

describe("NatsLink", () => {
  it("refuses to send credentials over plaintext ws:// to anything but loopback", async () => {
    const errorLog = vi.spyOn(console, "error").mockImplementation(() => {});
    for (const remote of ["ws://nats.example.com:4223", "ws://10.0.0.7:4223", "ws://[2001:db8::1]:4223"]) {
      const link = new NatsLink({ url: remote, token: "s3cret", onLoadReport: () => {} });
      await expect(link.get()).rejects.toThrow(/plaintext ws:\/\/.*wss:\/\//);
    }
    expect(errorLog).toHaveBeenCalledTimes(3);
    errorLog.mockRestore();
    expect(plaintextCredentialsProblem("wss://nats.example.com", true)).toBeUndefined();
    expect(plaintextCredentialsProblem("ws://nats.example.com", false)).toBeUndefined();
    for (const local of ["ws://127.0.0.1:4223", "ws://localhost:4223", "ws://[::1]:4223"]) {
      expect(plaintextCredentialsProblem(local, true)).toBeUndefined();
    }
    // Loopback with credentials connects (this server ignores them).
    const link = new NatsLink({ url, user: "gateway", pass: "pw", onLoadReport: () => {} });
    links.push(link);
    await expect(link.get()).resolves.toBeDefined();
  });
});

describe("Workers entry with dispatch shards", () => {
  // wrangler.jsonc's default pool and model, as the tests' GATEWAY_CONFIG binding leaves them.
  const pool = "default";
  const model = "stories15m-random";

  it("serves chat completions through a shard's NATS connection and settles usage", async () => {
    workers.push(await FakeWorker.start({ url, pool, workerId: "shard-w", model, direct: false }));
    const { key, hash } = await newKey();
    const req = post("/v1/chat/completions", key, { model, messages: [{ role: "user", content: "Hi" }], stream: true });
    const res = await exports.default.fetch(req);
    expect(res.status).toBe(200);
    const events = await sseEvents(res);
    expect(events.at(-1)).toBe("[DONE]");
    await eventually(async () => (await openReservations(hash)) === 0);
    const usage = (await (
      await exports.default.fetch(new Request("http://gateway/v1/usage", { headers: bearer(key) }))
    ).json()) as {
      totals: { requests: number; completion_tokens: number };
    };
    expect(usage.totals).toMatchObject({ requests: 1, completion_tokens: 3 });
  });

  it("cancels at the worker when the client disconnects, and the shard settles what was used", async () => {
    const w = await FakeWorker.start({
      url,
      pool,
      workerId: "shard-slow",
      model,
      direct: false,
      delayMs: 30,
      tokens: () => Array(200).fill("t"),
    });
    workers.push(w);
    const { key, hash } = await newKey();
    // The app as index.ts builds it, with request.signal standing for workerd's client-disconnect signal (which
    // only a real client can trigger: see the e2e tests).
    const { app, keys } = shardedApp();
    const ac = new AbortController();
    const res = await app.request(
      new Request(
        post("/v1/chat/completions", key, { model, messages: [{ role: "user", content: "long" }], stream: true }),
        {
          signal: ac.signal,
        },
      ),
    );
    const reader = res.body!.getReader();
    for (let i = 0; i < 4; i++) await reader.read();
    ac.abort();
    await eventually(() => w.cancelled.size === 1);
    await eventually(async () => (await openReservations(hash)) === 0);
    const report = await keys.usage({ hash }, "2000-01-01", "2999-12-31");
    expect(report!.totals.requests).toBe(1);
    expect(report!.totals.completion_tokens).toBeGreaterThanOrEqual(3);
    expect(report!.totals.completion_tokens).toBeLessThan(200);
  });

  it("answers 503 when the pool has no workers, through a real shard, and frees the reservation", async () => {
    const { key, hash } = await newKey({ max_concurrent: 1 });
    const { app } = shardedApp(
      parseGatewayConfig({ pools: { "no-workers-here": { max_context: 256, models: ["ghost"] } } }),
    );
    for (const stream of [false, true]) {
      const res = await app.request(post("/v1/completions", key, { model: "ghost", prompt: "x", stream }));
      expect(res.status).toBe(503);
      expect(await res.json()).toMatchObject({ error: { type: "server_error", code: "service_unavailable" } });
      expect(await openReservations(hash)).toBe(0); // the slot is free for the next attempt
    }
  });
});
