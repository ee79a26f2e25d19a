// Rate limits, quotas and the usage ledger, through the app and the keys' Durable Objects.
import { describe, expect, it } from "vitest";
import {
  ADMIN_SECRET,
  bearer,
  chat,
  eventually,
  MODEL,
  makeApp,
  newKey,
  openReservations,
  post,
  ScriptedBackend,
} from "./helpers.ts";

describe("rate limits", () => {
  it("admits exactly 50 of a burst of 200 concurrent requests on a 50 RPM key", async () => {
    const { app } = makeApp();
    const { key, hash } = await newKey({ rpm: 50 });
    const responses = await Promise.all(
      Array.from({ length: 200 }, () => app.request(post("/v1/chat/completions", key, chat()))),
    );
    const statuses = responses.map((r) => r.status);
    expect(statuses.filter((s) => s === 200)).toHaveLength(50);
    expect(statuses.filter((s) => s === 429)).toHaveLength(150);
    const refused = responses.find((r) => r.status === 429)!;
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    expect(Number(refused.headers.get("retry-after"))).toBeLessThanOrEqual(60);
    expect(refused.headers.get("x-ratelimit-limit-requests")).toBe("50");
    expect(refused.headers.get("x-ratelimit-remaining-requests")).toBe("0");
    expect(await refused.json()).toMatchObject({ error: { type: "requests", code: "rate_limit_exceeded" } });
    const ok = responses.find((r) => r.status === 200)!;
    expect(ok.headers.get("x-ratelimit-limit-requests")).toBe("50");
    expect(ok.headers.get("x-ratelimit-reset-requests")).toMatch(/^\d+(\.\d+)?s$|^\d+ms$|^\d+m/);
    await Promise.all(responses.filter((r) => !r.bodyUsed).map((r) => r.body?.cancel()));
    await eventually(async () => (await openReservations(hash)) === 0);
  });

  it("reserves prompt + max_tokens against TPM and settles to the actual count", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: ["a", "b", "c"], delayMs: 30 }));
    const { app } = makeApp(backend);
    const { key } = await newKey({ tpm: 1000 });
    // In flight: ~611 tokens reserved (prompt estimate + max_tokens).
    const first = app.request(post("/v1/chat/completions", key, chat({ max_tokens: 600 })));
    await eventually(() => backend.submissions.length === 1);
    const second = await app.request(post("/v1/chat/completions", key, chat({ max_tokens: 600 })));
    expect(second.status).toBe(429);
    expect(second.headers.get("x-ratelimit-limit-tokens")).toBe("1000");
    expect(Number(second.headers.get("x-ratelimit-remaining-tokens"))).toBeLessThan(600);
    expect(second.headers.get("retry-after")).toMatch(/^\d+$/);
    expect(await second.json()).toMatchObject({ error: { type: "tokens", code: "rate_limit_exceeded" } });
    // Settled to the 10 tokens actually used: the rest comes back at once.
    expect((await first).status).toBe(200);
    const third = await app.request(post("/v1/chat/completions", key, chat({ max_tokens: 600 })));
    expect(third.status).toBe(200);
    expect(Number(third.headers.get("x-ratelimit-remaining-tokens"))).toBeGreaterThan(300);
  });

  it("refuses a request larger than the TPM limit without asking to retry", async () => {
    const { app } = makeApp();
    const { key } = await newKey({ tpm: 100 });
    const res = await app.request(post("/v1/chat/completions", key, chat({ max_tokens: 200 })));
    expect(res.status).toBe(429);
    expect(res.headers.get("x-should-retry")).toBe("false");
  });

  it("limits concurrent requests and frees the slot when one ends", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: ["a", "b"], delayMs: 50 }));
    const { app } = makeApp(backend);
    const { key } = await newKey({ max_concurrent: 2 });
    const running = [1, 2].map(() => app.request(post("/v1/chat/completions", key, chat())));
    await eventually(() => backend.submissions.length === 2);
    const third = await app.request(post("/v1/chat/completions", key, chat()));
    expect(third.status).toBe(429);
    expect(await third.json()).toMatchObject({ error: { code: "rate_limit_exceeded" } });
    expect((await Promise.all(running)).map((r) => r.status)).toEqual([200, 200]);
    expect((await app.request(post("/v1/chat/completions", key, chat()))).status).toBe(200);
  });

  it("counts worker sequences (prompts × n) against max_concurrent", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: ["a", "b"], delayMs: 50 }));
    const { app } = makeApp(backend);
    const { key } = await newKey({ max_concurrent: 3 });
    const tooMany = await app.request(post("/v1/chat/completions", key, chat({ n: 4 })));
    expect(tooMany.status).toBe(429);
    expect(tooMany.headers.get("x-should-retry")).toBe("false");
    expect(((await tooMany.json()) as { error: { message: string } }).error.message).toContain("4 sequences");
    const two = app.request(post("/v1/completions", key, { model: MODEL, prompt: ["a", "b"] })); // 2 sequences
    await eventually(() => backend.submissions.length === 2);
    const busy = await app.request(post("/v1/chat/completions", key, chat({ n: 2 })));
    expect(busy.status).toBe(429);
    expect(busy.headers.get("retry-after")).toMatch(/^\d+$/);
    expect((await app.request(post("/v1/chat/completions", key, chat()))).status).toBe(200); // the third slot
    expect((await two).status).toBe(200);
  });

  it("caps a request without max_tokens to what the budget has left", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: ["a"] }));
    const { app } = makeApp(backend);
    const { key } = await newKey({ budget: { tokens: 100, period: "day" } });
    const res = await app.request(post("/v1/chat/completions", key, chat()));
    expect(res.status).toBe(200);
    // "Hi" may take up to 2 + 16 + 16 prompt tokens: 66 of the 100 are left for the completion.
    expect(backend.submissions[0]!.request.sampling?.max_tokens).toBe(66);
  });

  it("answers insufficient_quota before a request could overshoot the budget", async () => {
    const { app } = makeApp();
    const { key, id } = await newKey({ budget: { tokens: 100, period: "day" } });
    // Each request uses 10 tokens (7 prompt + 3 completion), and may use up to 37: "Hi" is 2 bytes, a token each
    // at most, plus the template's 16 per message and 16 per prompt, plus max_tokens.
    let admitted = 0;
    for (;;) {
      const res = await app.request(post("/v1/chat/completions", key, chat({ max_tokens: 3 })));
      if (res.status !== 200) {
        expect(res.status).toBe(429);
        expect(res.headers.get("x-should-retry")).toBe("false");
        expect(await res.json()).toMatchObject({ error: { type: "insufficient_quota", code: "insufficient_quota" } });
        break;
      }
      admitted++;
      await res.text();
    }
    expect(admitted).toBe(7); // 60 used + 37 fits in 100; 70 + 37 does not
    const usage = await app.request(`/admin/keys/${id}/usage`, { headers: bearer(ADMIN_SECRET) });
    expect(((await usage.json()) as { budget: { used: number } }).budget.used).toBe(70);
  });
});

describe("usage", () => {
  it("keeps a per-day, per-model ledger equal to the sum of the responses", async () => {
    const backend = new ScriptedBackend((_, r) => ({
      tokens: r.prompt.type === "tokens" ? ["a"] : ["a", "b", "c", "d"],
      promptTokens: 9,
      cachedTokens: 4,
    }));
    const { app } = makeApp(backend);
    const { key, id } = await newKey();
    let prompt = 0;
    let completion = 0;
    let cached = 0;
    for (const body of [chat(), chat({ n: 2 }), { model: MODEL, prompt: [1, 2, 3] }]) {
      const path = "messages" in body ? "/v1/chat/completions" : "/v1/completions";
      const res = await app.request(post(path, key, body));
      const u = (
        (await res.json()) as {
          usage: { prompt_tokens: number; completion_tokens: number; prompt_tokens_details: { cached_tokens: number } };
        }
      ).usage;
      prompt += u.prompt_tokens;
      completion += u.completion_tokens;
      cached += u.prompt_tokens_details.cached_tokens;
    }
    // A streamed request counts too.
    const streamed = await app.request(post("/v1/chat/completions", key, chat({ stream: true })));
    await streamed.text();
    prompt += 9;
    completion += 4;
    cached += 4;

    const own = await app.request("/v1/usage", { headers: bearer(key) });
    expect(own.status).toBe(200);
    const report = (await own.json()) as {
      totals: Record<string, number>;
      data: { model: string }[];
      key: { id: string };
    };
    expect(report.totals).toEqual({
      requests: 4,
      prompt_tokens: prompt,
      completion_tokens: completion,
      cached_tokens: cached,
    });
    expect(report.data.map((r) => r.model)).toEqual([MODEL]);
    expect(report.key.id).toBe(id);

    const admin = await app.request(`/admin/keys/${id}/usage`, { headers: bearer(ADMIN_SECRET) });
    expect(((await admin.json()) as { totals: unknown }).totals).toEqual(report.totals);
  });

  it("rejects a malformed date range", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    const res = await app.request("/v1/usage?start_date=yesterday", { headers: bearer(key) });
    expect(res.status).toBe(400);
    expect(await res.json()).toMatchObject({ error: { param: "start_date" } });
  });
});
