// A budget is a hard cap: whatever requests come (lengths, n, with or without max_tokens, streamed or not, cut off
// by their clients at any point, concurrently), the ledger never passes it. 500 random requests against the real
// key Durable Object, with a scripted pool that uses anything up to what each request allows.
import type { SubmitRequest } from "@llama-edge/shared";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { maxPromptTokens } from "../src/dispatch/routing.ts";
import {
  ADMIN_SECRET,
  bearer,
  eventually,
  MODEL,
  makeApp,
  newKey,
  openReservations,
  post,
  ScriptedBackend,
  testConfig,
} from "./helpers.ts";

const BUDGET = 4000;
const CONCURRENCY = 20;

const use = fc.oneof(
  { arbitrary: fc.constant(1), weight: 3 },
  { arbitrary: fc.double({ min: 0, max: 1, noNaN: true }), weight: 1 },
);

const requestArb = fc.record({
  chat: fc.boolean(),
  /** Prompt text length in characters (some multi-byte). */
  text: fc.string({ unit: fc.constantFrom("a", "b", " ", "é", "語"), minLength: 1, maxLength: 120 }),
  prompts: fc.integer({ min: 1, max: 3 }),
  n: fc.integer({ min: 1, max: 3 }),
  maxTokens: fc.option(fc.integer({ min: 1, max: 60 }), { nil: null }),
  stream: fc.boolean(),
  /** Cut off by the client after this many chunks (streams) or ms (non-streaming); null = read to the end. */
  abortAfter: fc.option(fc.integer({ min: 0, max: 6 }), { nil: null, freq: 3 }),
  /** What the pool uses, as fractions of what the request allows: mostly all of it, the case that overshoots. */
  promptUse: use,
  completionUse: use,
});
type Spec = typeof requestArb extends fc.Arbitrary<infer T> ? T : never;

/** A pool that uses anything up to what a request allows: its prompt up to the bound, its completion up to its
 *  max_tokens (or the pool's context). */
function poolFor(specs: Spec[]) {
  return new ScriptedBackend((pool, r: SubmitRequest) => {
    // Each prompt starts with its spec's index.
    const text =
      (r.prompt.type === "chat" ? r.prompt.messages[0]!.content : r.prompt.type === "text" ? r.prompt.text : "") ?? "";
    const spec = specs[Number(text.split("|")[0])];
    if (!spec) throw new Error(`no spec for ${r.id}`);
    const context = testConfig.pools[pool]!.max_context;
    const promptTokens = Math.max(1, Math.floor(spec.promptUse * maxPromptTokens(r.prompt)));
    const room = Math.min(r.sampling?.max_tokens ?? Number.POSITIVE_INFINITY, context - promptTokens);
    const completion = Math.floor(spec.completionUse * Math.max(0, room));
    return {
      tokens: Array.from({ length: completion }, () => "t"),
      finish: completion === room ? "length" : "stop",
      promptTokens,
      delayMs: 1,
    };
  });
}

async function send(app: ReturnType<typeof makeApp>["app"], key: string, spec: Spec, index: number) {
  const prompts = Array.from({ length: spec.prompts }, (_, i) => `${index}|${spec.text} ${i}`);
  const body = spec.chat
    ? { model: MODEL, messages: prompts.map((content) => ({ role: "user", content })), n: spec.n }
    : { model: MODEL, prompt: prompts, n: spec.n };
  const ac = new AbortController();
  const req = post(spec.chat ? "/v1/chat/completions" : "/v1/completions", key, {
    ...body,
    ...(spec.maxTokens !== null ? { max_tokens: spec.maxTokens } : {}),
    stream: spec.stream,
  });
  if (!spec.stream && spec.abortAfter !== null) setTimeout(() => ac.abort(), spec.abortAfter);
  const res = await Promise.resolve(app.request(new Request(req, { signal: ac.signal }))).catch(() => undefined);
  if (!res) return 499;
  if (!res.body) return res.status;
  const reader = res.body.getReader();
  for (let chunks = 0; ; chunks++) {
    if (spec.stream && spec.abortAfter !== null && chunks === spec.abortAfter) {
      ac.abort();
      await reader.cancel().catch(() => {});
      return 499;
    }
    const r = await reader.read().catch(() => ({ done: true }));
    if (r.done) return res.status;
  }
}

describe("budgets", () => {
  it("are never overshot: 500 random requests, some cut off, against a small budget", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(requestArb, { minLength: 500, maxLength: 500 }), async (specs) => {
        const { app } = makeApp(poolFor(specs));
        const { key, id, hash } = await newKey({ budget: { tokens: BUDGET, period: "day" } });
        const statuses: number[] = [];
        for (let i = 0; i < specs.length; i += CONCURRENCY) {
          const batch = specs.slice(i, i + CONCURRENCY).map((spec, j) => send(app, key, spec, i + j));
          statuses.push(...(await Promise.all(batch)));
        }
        await eventually(async () => (await openReservations(hash)) === 0, 10_000);
        const report = (await (
          await app.request(`/admin/keys/${id}/usage`, { headers: bearer(ADMIN_SECRET) })
        ).json()) as { totals: { prompt_tokens: number; completion_tokens: number }; budget: { used: number } };
        const ledger = report.totals.prompt_tokens + report.totals.completion_tokens;
        expect(ledger).toBeLessThanOrEqual(BUDGET);
        expect(report.budget.used).toBe(ledger);
        // The run reached the budget: some requests were refused for it.
        expect(statuses).toContain(429);
        expect(statuses).toContain(200);
      }),
      { numRuns: 1, endOnFailure: true },
    );
  }, 120_000);
});
