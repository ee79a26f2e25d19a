// GET /metrics: the gateway's Prometheus metrics (requests by route and status, 429s by limit, tokens by key), from
// the real key and request counter Durable Objects. Requests run with an ExecutionContext the test waits on, so the
// counts handed over in waitUntil are stored before /metrics is read.

import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { DurableRequestCounters } from "../src/durable/request-counters.ts";
import worker from "../src/index.ts";
import type { RequestCounterStore, RequestCounts } from "../src/metrics/request-counts.ts";
import { ADMIN_SECRET, bearer, chat, keyStore, MODEL, makeApp, post, ScriptedBackend } from "./helpers.ts";

type Fetch = (req: Request) => Promise<Response>;

/** Sends `req`, reads the answer and waits for everything it left in waitUntil; returns the answer, re-readable. */
const settled =
  (fetch: (req: Request, ctx: ExecutionContext) => Response | Promise<Response>): Fetch =>
  async (req) => {
    const ctx = createExecutionContext();
    const res = await fetch(req, ctx);
    const body = await res.arrayBuffer();
    await waitOnExecutionContext(ctx);
    return new Response(body, res);
  };

/** A sample's value in an exposition, or undefined if the series is absent. */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split("\n")) {
    const m = /^(\w+)\{(.*)\} (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have: string[] = m[2]!.match(/\w+="(?:[^"\\]|\\.)*"/g) ?? [];
    if (have.length === want.length && want.every((w) => have.includes(w))) return Number(m[3]);
  }
  return undefined;
}

const scrape = (send: Fetch) => send(new Request("http://gateway/metrics", { headers: bearer(ADMIN_SECRET) }));

describe("GET /metrics", () => {
  it("counts answers by route and status, 429s by the limit that refused, tokens by key", async () => {
    const requestCounters = new DurableRequestCounters(env.REQUEST_COUNTERS, { name: crypto.randomUUID() });
    const { app } = makeApp(new ScriptedBackend(() => ({ tokens: ["a", "b", "c"], promptTokens: 7 })), undefined, {
      requestCounters,
    });
    const send = settled((req, ctx) => app.request(req, undefined, env, ctx));
    const { key, info } = await keyStore().create({ name: 'ci "nightly"', limits: { rpm: 1 } });

    expect((await send(post("/v1/chat/completions", key, chat()))).status).toBe(200);
    expect((await send(post("/v1/chat/completions", key, { model: MODEL }))).status).toBe(400);
    expect((await send(post("/v1/chat/completions", "sk-not-a-key", chat()))).status).toBe(401);
    expect((await send(post("/v1/chat/completions", key, chat()))).status).toBe(429); // rpm 1
    expect((await send(new Request("http://gateway/v1/nowhere", { headers: bearer(key) }))).status).toBe(404);
    expect((await send(new Request("http://gateway/metrics"))).status).toBe(401);

    const res = await scrape(send);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8");
    const text = await res.text();
    for (const name of ["requests_total", "rate_limited_total", "tokens_total"]) {
      expect(text).toContain(`# TYPE llama_gateway_${name} counter`);
    }
    const requests = (route: string, status: string) => sample(text, "llama_gateway_requests_total", { route, status });
    expect(requests("/v1/chat/completions", "200")).toBe(1);
    expect(requests("/v1/chat/completions", "400")).toBe(1);
    expect(requests("/v1/chat/completions", "401")).toBe(1);
    expect(requests("/v1/chat/completions", "429")).toBe(1);
    expect(requests("/v1/*", "404")).toBe(1); // an unknown path adds no label value of its own
    expect(requests("/metrics", "401")).toBe(1);
    // The key's own counters: its id, never the key.
    const limited = (limit: string) => sample(text, "llama_gateway_rate_limited_total", { key: info.id, limit });
    expect([limited("rpm"), limited("tpm"), limited("max_concurrent"), limited("budget")]).toEqual([1, 0, 0, 0]);
    const tokens = (kind: string) => sample(text, "llama_gateway_tokens_total", { key: info.id, model: MODEL, kind });
    expect([tokens("prompt"), tokens("completion")]).toEqual([7, 3]);
    expect(sample(text, "llama_gateway_key_info", { key: info.id, name: 'ci \\"nightly\\"', revoked: "false" })).toBe(
      1,
    );
    expect(text).not.toContain(key);

    // The scrape itself was counted, after it answered.
    expect(requests("/metrics", "200")).toBeUndefined();
    const again = await (await scrape(send)).text();
    expect(sample(again, "llama_gateway_requests_total", { route: "/metrics", status: "200" })).toBe(1);
  });

  it("is refused without the admin secret, through the Workers entry", async () => {
    const send = settled((req, ctx) => worker.fetch(req as Parameters<typeof worker.fetch>[0], env, ctx));
    const before = await (await scrape(send)).text();
    const count = (text: string) =>
      sample(text, "llama_gateway_requests_total", { route: "/metrics", status: "401" }) ?? 0;
    const refused = await send(new Request("http://gateway/metrics"));
    expect(refused.status).toBe(401);
    const wrong = await send(new Request("http://gateway/metrics", { headers: bearer("not-the-admin-secret-0000") }));
    expect(wrong.status).toBe(401);
    expect(await wrong.json()).toMatchObject({ error: { code: "invalid_api_key" } });
    expect(count(await (await scrape(send)).text())).toBe(count(before) + 2);
  });

  it("is off, like the admin API, without an admin secret", async () => {
    const { app } = makeApp(undefined, undefined, { adminSecret: undefined });
    const res = await app.request("/metrics", { headers: bearer(ADMIN_SECRET) });
    expect(res.status).toBe(401);
    expect(await res.json()).toMatchObject({ error: { code: "admin_disabled" } });
  });

  it("keeps counts a failed hand-over could not store, and stores them with the next request's", async () => {
    const real = new DurableRequestCounters(env.REQUEST_COUNTERS, { name: crypto.randomUUID() });
    let failures = 1;
    const flaky: RequestCounterStore = {
      add: (counts: RequestCounts) =>
        failures-- > 0 ? Promise.reject(new Error("injected failure")) : real.add(counts),
      counts: () => real.counts(),
    };
    const { app } = makeApp(undefined, undefined, { requestCounters: flaky });
    const send = settled((req, ctx) => app.request(req, undefined, env, ctx));
    await send(new Request("http://gateway/health"));
    expect(await real.counts()).toEqual({});
    await send(new Request("http://gateway/health"));
    expect(Object.values(await real.counts())).toEqual([2]);
  });
});
