import { describe, expect, it } from "vitest";
import { KeyLimiter, type KvStore, WINDOW_MS } from "./key-limiter.ts";
import { type KeyInfo, type Limits, UNLIMITED } from "./types.ts";

class MemoryKv implements KvStore {
  readonly map = new Map<string, unknown>();
  get<T>(key: string): T | undefined {
    return structuredClone(this.map.get(key)) as T | undefined;
  }
  put<T>(key: string, value: T): void {
    this.map.set(key, structuredClone(value));
  }
  delete(key: string): boolean {
    return this.map.delete(key);
  }
  *list<T>(options?: { prefix?: string }): Iterable<[string, T]> {
    for (const k of [...this.map.keys()].sort()) {
      if (!options?.prefix || k.startsWith(options.prefix)) yield [k, this.get<T>(k)!];
    }
  }
}

function setup(limits: Partial<Limits>) {
  const kv = new MemoryKv();
  let now = Date.UTC(2026, 0, 1, 12);
  const clock = { advance: (ms: number) => (now += ms) };
  const info: KeyInfo = {
    id: "key_test",
    object: "api_key",
    name: "",
    hint: "sk-...test",
    created_at: 0,
    revoked_at: null,
    limits: { ...UNLIMITED, ...limits },
  };
  const limiter = new KeyLimiter(kv, () => now);
  limiter.create(info);
  const admit = (tokens = 10, l = limiter) => l.admit({ model: "m", tokens, expiresAt: now + 60_000 });
  return { kv, clock, limiter, admit, reopen: () => new KeyLimiter(kv, () => now) };
}

const zero = { model: "m", prompt_tokens: 0, completion_tokens: 0, cached_tokens: 0 };

describe("KeyLimiter RPM (sliding window)", () => {
  it("admits rpm requests per rolling minute, exactly", () => {
    const { admit, clock } = setup({ rpm: 3 });
    expect(admit().ok).toBe(true);
    clock.advance(1000);
    expect([admit(), admit(), admit()].map((r) => r.ok)).toEqual([true, true, false]);
    clock.advance(WINDOW_MS - 1001);
    expect(admit().ok).toBe(false);
    clock.advance(1); // the first admission leaves the window, the other two stay
    expect(admit().ok).toBe(true);
    expect(admit().ok).toBe(false);
  });

  it("reports retry-after until the oldest admission leaves the window", () => {
    const { admit, clock } = setup({ rpm: 2 });
    admit();
    clock.advance(10_000);
    admit();
    const r = admit();
    expect(r.ok).toBe(false);
    if (!r.ok) {
      expect(r.reason).toBe("requests");
      expect(r.retryAfterMs).toBe(50_000);
      expect(r.rate?.requests).toEqual({ limit: 2, remaining: 0, resetMs: 60_000 });
    }
  });

  it("survives a restart of the Durable Object", () => {
    const { admit, reopen, clock } = setup({ rpm: 3 });
    admit();
    clock.advance(1000);
    admit();
    const again = reopen();
    expect(again.admit({ model: "m", tokens: 1, expiresAt: Number.MAX_SAFE_INTEGER }).ok).toBe(true);
    expect(again.admit({ model: "m", tokens: 1, expiresAt: Number.MAX_SAFE_INTEGER }).ok).toBe(false);
    expect(reopen().rateInfo().requests?.remaining).toBe(0);
  });

  it("keeps the most recent admissions when the limit changes", () => {
    const { admit, limiter } = setup({ rpm: 5 });
    for (let i = 0; i < 4; i++) admit();
    limiter.update({ limits: { rpm: 2 } });
    expect(admit().ok).toBe(false);
    limiter.update({ limits: { rpm: 10 } });
    expect(limiter.rateInfo().requests?.remaining).toBe(8);
  });
});

describe("KeyLimiter TPM, concurrency, budget", () => {
  it("refunds what a reservation over-estimated and refills over the minute", () => {
    const { admit, limiter, clock } = setup({ tpm: 100 });
    const r = admit(80);
    expect(admit(30).ok).toBe(false);
    if (r.ok) limiter.settle(r.reservationId, { ...zero, prompt_tokens: 5, completion_tokens: 5 });
    expect(limiter.rateInfo().tokens?.remaining).toBe(90);
    expect(admit(90).ok).toBe(true);
    clock.advance(WINDOW_MS / 2);
    expect(limiter.rateInfo().tokens?.remaining).toBe(50);
  });

  it("frees concurrency slots on settle, once, and drops expired reservations", () => {
    const { admit, limiter, clock } = setup({ max_concurrent: 1 });
    const r = admit();
    expect(admit().ok).toBe(false);
    if (!r.ok) throw new Error("not admitted");
    expect(limiter.settle(r.reservationId, zero)).toBe(true);
    expect(limiter.settle(r.reservationId, zero)).toBe(false); // idempotent
    expect(admit().ok).toBe(true);
    clock.advance(61_000); // past expiresAt: its dispatcher never settled it
    expect(admit().ok).toBe(true);
  });

  it("stops at the budget and starts again next period", () => {
    const { admit, limiter, clock } = setup({ budget: { tokens: 20, period: "day" } });
    const r = admit();
    if (!r.ok) throw new Error("not admitted");
    limiter.settle(r.reservationId, { ...zero, prompt_tokens: 15, completion_tokens: 5 });
    const refused = admit();
    expect(refused.ok || refused.reason).toBe("quota");
    clock.advance(24 * 3600_000);
    expect(admit().ok).toBe(true);
  });

  it("refuses revoked keys and models outside the allowlist", () => {
    const { admit, limiter } = setup({ models: ["x"] });
    const r = admit();
    expect(r.ok || r.reason).toBe("model_not_allowed");
    limiter.revoke();
    const r2 = admit();
    expect(r2.ok || r2.reason).toBe("revoked");
  });
});

describe("KeyLimiter budget: never overshot", () => {
  it("counts this request's reservation too: a 25-token budget does not admit a third 10-token request", () => {
    const { admit, limiter } = setup({ budget: { tokens: 25, period: "day" } });
    for (let i = 0; i < 2; i++) {
      const r = admit(10);
      if (!r.ok) throw new Error("not admitted");
      limiter.settle(r.reservationId, { ...zero, prompt_tokens: 7, completion_tokens: 3 });
    }
    const third = admit(10);
    expect(third.ok || third.reason).toBe("quota");
    expect(admit(5).ok).toBe(true); // 20 + 5 fits exactly
  });

  it("reserves context × choices for a request without max_tokens, or caps it to what the budget has left", () => {
    const { limiter, clock } = setup({ budget: { tokens: 1000, period: "day" } });
    const expiresAt = clock.advance(0) + 60_000;
    const need = { promptTokens: 100, choices: 2, maxTokens: null, maxContext: 256 };
    const whole = limiter.admit({ model: "m", tokens: 10, budget: need, expiresAt });
    expect(whole).toMatchObject({ ok: true });
    expect(whole.ok && whole.maxTokens).toBe(undefined); // 100 + 2 × 256 fits: no cap
    expect(limiter.usage("2026-01-01", "2026-01-01")?.budget?.reserved).toBe(612);
    const capped = limiter.admit({ model: "m", tokens: 10, budget: need, expiresAt });
    expect(capped.ok && capped.maxTokens).toBe(144); // (1000 - 612 - 100) / 2
    const none = limiter.admit({ model: "m", tokens: 10, budget: need, expiresAt });
    expect(none.ok || none.reason).toBe("quota"); // 1 token left: not even the prompt fits
    const withMax = limiter.admit({ model: "m", tokens: 10, budget: { ...need, maxTokens: 1 }, expiresAt });
    expect(withMax.ok || withMax.reason).toBe("quota"); // an explicit max_tokens is refused, never cut
  });

  it("counts usage in the day the request was admitted, and only that day's reservations", () => {
    const { admit, limiter, clock } = setup({ budget: { tokens: 50, period: "day" } });
    clock.advance(12 * 3600_000 - 1); // 23:59:59.999 on 2026-01-01
    const late = admit(40);
    if (!late.ok) throw new Error("not admitted");
    clock.advance(1000); // 2026-01-02: yesterday's reservation does not hold today's budget
    expect(admit(45).ok).toBe(true);
    limiter.settle(late.reservationId, { ...zero, prompt_tokens: 30, completion_tokens: 10 });
    const report = limiter.usage("2026-01-01", "2026-01-02")!;
    expect(report.data).toEqual([
      { date: "2026-01-01", model: "m", requests: 1, prompt_tokens: 30, completion_tokens: 10, cached_tokens: 0 },
    ]);
    expect(report.budget).toMatchObject({ used: 0, reserved: 45 });
  });
});

describe("KeyLimiter concurrency counts sequences", () => {
  it("admits prompts × n sequences up to max_concurrent, and refuses a request larger than the limit for good", () => {
    const { limiter, clock } = setup({ max_concurrent: 4 });
    const expiresAt = clock.advance(0) + 60_000;
    const a = limiter.admit({ model: "m", tokens: 1, sequences: 3, expiresAt });
    expect(a.ok).toBe(true);
    const b = limiter.admit({ model: "m", tokens: 1, sequences: 2, expiresAt });
    expect(b.ok || b.reason).toBe("concurrency");
    expect(limiter.admit({ model: "m", tokens: 1, sequences: 1, expiresAt }).ok).toBe(true);
    const huge = limiter.admit({ model: "m", tokens: 1, sequences: 5, expiresAt });
    expect(huge.ok || huge.reason).toBe("too_many_sequences");
    if (a.ok) limiter.settle(a.reservationId, zero);
    expect(limiter.admit({ model: "m", tokens: 1, sequences: 3, expiresAt }).ok).toBe(true);
  });
});

describe("KeyLimiter leases", () => {
  it("settles a lapsed reservation by policy, its last renewal's usage, and a late settlement charges the rest", () => {
    const { limiter, clock, reopen } = setup({ max_concurrent: 1 });
    const t0 = clock.advance(0);
    const r = limiter.admit({ model: "m", tokens: 50, leaseUntil: t0 + 10_000, expiresAt: t0 + 120_000 });
    if (!r.ok) throw new Error("not admitted");
    clock.advance(5_000);
    const progress = { ...zero, prompt_tokens: 5, completion_tokens: 7 };
    expect(limiter.renew(r.reservationId, progress, clock.advance(0) + 10_000)).toBe(true);
    clock.advance(9_000);
    expect(limiter.numOpenReservations).toBe(1); // renewed: still running
    clock.advance(2_000); // the runner died: no renewal for a whole lease
    const again = reopen(); // whatever the object did in between (evicted, restarted)
    expect(again.numOpenReservations).toBe(0);
    expect(again.admit({ model: "m", tokens: 1, expiresAt: t0 + 120_000 }).ok).toBe(true); // the slot is back
    expect(again.usage("2026-01-01", "2026-01-01")!.totals).toEqual({
      requests: 1,
      prompt_tokens: 5,
      completion_tokens: 7,
      cached_tokens: 0,
    });
    expect(again.renew(r.reservationId, progress, clock.advance(0) + 10_000)).toBe(false);
    // The runner's exact settlement still arrives (say the client's request saw the end): only the rest is added.
    expect(again.settle(r.reservationId, { ...zero, prompt_tokens: 5, completion_tokens: 9 })).toBe(true);
    expect(again.settle(r.reservationId, { ...zero, prompt_tokens: 5, completion_tokens: 9 })).toBe(false);
    expect(again.usage("2026-01-01", "2026-01-01")!.totals).toMatchObject({ requests: 1, completion_tokens: 9 });
  });

  it("charges nothing for a reservation that lapsed before any renewal", () => {
    const { limiter, clock } = setup({});
    const t0 = clock.advance(0);
    limiter.admit({ model: "m", tokens: 50, leaseUntil: t0 + 1000, expiresAt: t0 + 60_000 });
    clock.advance(1000);
    expect(limiter.numOpenReservations).toBe(0);
    expect(limiter.usage("2026-01-01", "2026-01-01")!.totals).toMatchObject({ requests: 1, prompt_tokens: 0 });
  });
});

describe("KeyLimiter ledger", () => {
  it("accumulates per day and model", () => {
    const { admit, limiter, clock } = setup({});
    for (const [model, p, c] of [
      ["a", 10, 5],
      ["a", 1, 1],
      ["b", 2, 2],
    ] as const) {
      const r = limiter.admit({ model, tokens: 1, expiresAt: Number.MAX_SAFE_INTEGER });
      if (r.ok) limiter.settle(r.reservationId, { model, prompt_tokens: p, completion_tokens: c, cached_tokens: 1 });
    }
    clock.advance(24 * 3600_000);
    const r = admit();
    if (r.ok) limiter.settle(r.reservationId, { ...zero, model: "a", prompt_tokens: 100 });
    const report = limiter.usage("2026-01-01", "2026-01-02")!;
    expect(report.data).toEqual([
      { date: "2026-01-01", model: "a", requests: 2, prompt_tokens: 11, completion_tokens: 6, cached_tokens: 2 },
      { date: "2026-01-01", model: "b", requests: 1, prompt_tokens: 2, completion_tokens: 2, cached_tokens: 1 },
      { date: "2026-01-02", model: "a", requests: 1, prompt_tokens: 100, completion_tokens: 0, cached_tokens: 0 },
    ]);
    expect(limiter.usage("2026-01-02", "2026-01-02")!.totals.prompt_tokens).toBe(100);
    // The all-time counters /metrics exports: every day of the ledger, per model.
    expect(limiter.counters().tokens).toEqual({
      a: { prompt_tokens: 111, completion_tokens: 6 },
      b: { prompt_tokens: 2, completion_tokens: 2 },
    });
  });
});

describe("KeyLimiter counters", () => {
  it("counts 429s by the limit that refused, and survives a restart", () => {
    const { admit, limiter, reopen } = setup({
      rpm: 1,
      tpm: 100,
      max_concurrent: 2,
      budget: { tokens: 1000, period: "day" },
    });
    expect(limiter.counters().refused).toEqual({ rpm: 0, tpm: 0, max_concurrent: 0, budget: 0 });
    expect(admit(200).ok).toBe(false); // larger than the TPM limit
    expect(limiter.admit({ model: "m", tokens: 1, sequences: 3, expiresAt: Number.MAX_SAFE_INTEGER }).ok).toBe(false);
    expect(admit(2000).ok).toBe(false); // more than the budget holds
    expect(admit().ok).toBe(true);
    expect(admit().ok).toBe(false); // RPM
    expect(limiter.counters().refused).toEqual({ rpm: 1, tpm: 1, max_concurrent: 1, budget: 1 });
    expect(reopen().counters().refused).toEqual({ rpm: 1, tpm: 1, max_concurrent: 1, budget: 1 });
  });

  it("does not count refusals that are not limits", () => {
    const { limiter } = setup({ models: ["other"] });
    expect(limiter.admit({ model: "m", tokens: 1, expiresAt: Number.MAX_SAFE_INTEGER }).ok).toBe(false);
    limiter.revoke();
    expect(limiter.admit({ model: "other", tokens: 1, expiresAt: Number.MAX_SAFE_INTEGER }).ok).toBe(false);
    expect(limiter.counters().refused).toEqual({ rpm: 0, tpm: 0, max_concurrent: 0, budget: 0 });
  });
});
