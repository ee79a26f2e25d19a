/**
 * End to end: the official `openai` client against the gateway under workerd (`wrangler dev`), talking over NATS
 * (WebSocket) to a real `llama-worker serve` running the generated default model. Nothing is mocked.
 */
import { connect } from "@nats-io/transport-node";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { admin, type Gateway } from "../edge/dev/gateway.mjs";
import type { TestNats } from "./helpers/nats-server.ts";
import { startStack, type TestStack } from "./helpers/stack.ts";
import { startWorkerProcess, type WorkerProcess } from "./helpers/worker-process.ts";

const MODEL = "stories15m-random";
/** The default model's context (max_position_embeddings). */
const CONTEXT = 256;

let stack: TestStack;
let nats: TestNats;
let worker: WorkerProcess;
let gw: Gateway;

beforeAll(async () => {
  stack = await startStack({
    workerId: "e2e-w1",
    config: { pools: { default: { max_context: CONTEXT, models: [MODEL] } }, expose_worker_id: true },
  });
  ({ nats, worker, gw } = stack);
}, 180_000);

afterAll(() => stack?.stop());

async function newKey(limits: Record<string, unknown> = {}): Promise<{ key: string; id: string }> {
  const created = await admin(gw, "POST", "/keys", { name: "e2e", limits });
  return { key: created.key as string, id: created.id as string };
}

const client = (apiKey: string) => new OpenAI({ apiKey, baseURL: `${gw.url}/v1`, maxRetries: 0, timeout: 60_000 });

describe("the openai client, unchanged", () => {
  it("chats without and with streaming", async () => {
    const openai = client((await newKey()).key);
    const res = await openai.chat.completions.create({
      model: MODEL,
      messages: [
        { role: "system", content: "You tell short stories." },
        { role: "user", content: "Once upon a time" },
      ],
      max_tokens: 8,
      temperature: 0,
    });
    expect(res.object).toBe("chat.completion");
    expect(res.choices[0]!.message.role).toBe("assistant");
    expect(typeof res.choices[0]!.message.content).toBe("string");
    expect(res.choices[0]!.finish_reason).toMatch(/stop|length/);
    expect(res.usage!.completion_tokens).toBeGreaterThan(0);
    expect(res.usage!.total_tokens).toBe(res.usage!.prompt_tokens + res.usage!.completion_tokens);
    expect(res.usage!.prompt_tokens_details?.cached_tokens).toBeTypeOf("number");

    const stream = await openai.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "Once upon a time" }],
      max_tokens: 8,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    expect(chunks[0]!.choices[0]!.delta.role).toBe("assistant");
    const finish = chunks.find((c) => c.choices[0]?.finish_reason);
    expect(finish?.choices[0]?.finish_reason).toMatch(/stop|length/);
    const last = chunks.at(-1)!;
    expect(last.choices).toEqual([]);
    expect(last.usage!.completion_tokens).toBeGreaterThan(0);
    const text = chunks.map((c) => c.choices[0]?.delta.content ?? "").join("");
    // Greedy decoding: the streamed text equals the non-streamed one for the same prompt.
    const again = await openai.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "Once upon a time" }],
      max_tokens: 8,
      temperature: 0,
    });
    expect(text).toBe(again.choices[0]!.message.content);
  });

  it("completes text, several prompts and token ids, streaming or not", async () => {
    const openai = client((await newKey()).key);
    const one = await openai.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 5 });
    expect(one.object).toBe("text_completion");
    expect(one.choices).toHaveLength(1);
    const many = await openai.completions.create({ model: MODEL, prompt: ["A", "B"], n: 2, max_tokens: 3 });
    expect(many.choices.map((c) => c.index).sort()).toEqual([0, 1, 2, 3]);
    const tokens = await openai.completions.create({ model: MODEL, prompt: [1, 9038, 2501, 263, 931], max_tokens: 3 });
    expect(tokens.usage!.prompt_tokens).toBe(5);
    const stream = await openai.completions.create({ model: MODEL, prompt: "Hi", max_tokens: 4, stream: true });
    let text = "";
    for await (const c of stream) text += c.choices[0]?.text ?? "";
    expect(text.length).toBeGreaterThan(0);
  });

  it("lists and retrieves models", async () => {
    const openai = client((await newKey()).key);
    const list = await openai.models.list();
    expect(list.data.map((m) => m.id)).toEqual([MODEL]);
    expect((await openai.models.retrieve(MODEL)).id).toBe(MODEL);
    await expect(openai.models.retrieve("nope")).rejects.toBeInstanceOf(OpenAI.NotFoundError);
  });
});

describe("typed errors", () => {
  it("AuthenticationError for a wrong or revoked key", async () => {
    await expect(client(`sk-${"x".repeat(48)}`).models.list()).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
    const { key, id } = await newKey();
    await client(key).models.list();
    await admin(gw, "DELETE", `/keys/${id}`);
    await expect(client(key).models.list()).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
  });

  it("BadRequestError, NotFoundError and RateLimitError for the matching cases", async () => {
    const openai = client((await newKey({ rpm: 3 })).key);
    const bad = openai.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "x" }],
      temperature: "hot" as unknown as number,
    });
    await expect(bad).rejects.toMatchObject({ status: 400, param: "temperature", type: "invalid_request_error" });
    await expect(bad).rejects.toBeInstanceOf(OpenAI.BadRequestError);
    const long = openai.completions.create({ model: MODEL, prompt: Array(CONTEXT + 10).fill(100), max_tokens: 1 });
    await expect(long).rejects.toMatchObject({ status: 400, code: "context_length_exceeded" });
    const missing = openai.chat.completions.create({ model: "gpt-9", messages: [{ role: "user", content: "x" }] });
    await expect(missing).rejects.toBeInstanceOf(OpenAI.NotFoundError);
    await expect(missing).rejects.toMatchObject({ code: "model_not_found" });
    // 3 requests were admitted or refused before admission? Only admitted ones count: none so far.
    for (let i = 0; i < 3; i++) await openai.completions.create({ model: MODEL, prompt: "a", max_tokens: 1 });
    const limited = openai.completions.create({ model: MODEL, prompt: "a", max_tokens: 1 });
    await expect(limited).rejects.toBeInstanceOf(OpenAI.RateLimitError);
    const err = (await limited.catch((e) => e)) as InstanceType<typeof OpenAI.RateLimitError>;
    expect(Number(err.headers?.get("retry-after"))).toBeGreaterThan(0);
    expect(err.headers?.get("x-ratelimit-limit-requests")).toBe("3");
  });
});

describe("accounting and cancellation", () => {
  it("keeps the ledger equal to the sum of the responses' usage", async () => {
    const { key, id } = await newKey();
    const openai = client(key);
    const sum = { prompt: 0, completion: 0, cached: 0, requests: 0 };
    const add = (u: OpenAI.CompletionUsage | undefined | null) => {
      sum.prompt += u!.prompt_tokens;
      sum.completion += u!.completion_tokens;
      sum.cached += u!.prompt_tokens_details?.cached_tokens ?? 0;
      sum.requests += 1;
    };
    add(
      (
        await openai.chat.completions.create({
          model: MODEL,
          messages: [{ role: "user", content: "Hi" }],
          max_tokens: 6,
        })
      ).usage,
    );
    add((await openai.completions.create({ model: MODEL, prompt: ["x", "y"], max_tokens: 4 })).usage);
    const stream = await openai.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "Hi" }],
      max_tokens: 6,
      stream: true,
      stream_options: { include_usage: true },
    });
    for await (const c of stream) if (c.usage) add(c.usage);
    const usage = (await admin(gw, "GET", `/keys/${id}/usage`)) as { totals: Record<string, number> };
    expect(usage.totals).toEqual({
      requests: sum.requests,
      prompt_tokens: sum.prompt,
      completion_tokens: sum.completion,
      cached_tokens: sum.cached,
    });
  });

  it("cancels the request at the worker when the client disconnects mid-stream", async () => {
    const { key, id } = await newKey({ max_concurrent: 1 });
    const openai = client(key);
    // Background streams (another key) slow each engine step, so the cut-off stream cannot finish its 200 tokens
    // before the cancel arrives even on a loaded machine: the tiny model alone makes them in well under a second.
    const busy = client((await newKey()).key);
    const background = Array.from({ length: 12 }, () =>
      busy.completions.create({
        model: MODEL,
        prompt: "Once",
        max_tokens: 200,
        ignore_eos: true,
      } as OpenAI.CompletionCreateParamsNonStreaming),
    );
    const { data: stream, response } = await openai.chat.completions
      .create(
        // ignore_eos is vLLM's extra: generate until max_tokens, long enough to be cut off.
        {
          model: MODEL,
          messages: [{ role: "user", content: "Tell me everything" }],
          max_tokens: 200,
          stream: true,
          ignore_eos: true,
        } as OpenAI.ChatCompletionCreateParamsStreaming,
      )
      .withResponse();
    // The workers' request ids start with the gateway's x-request-id.
    const requestId = response.headers.get("x-request-id") ?? "no x-request-id";
    let n = 0;
    // Leaving the loop aborts the HTTP request: the client disconnects.
    for await (const _ of stream) if (++n === 2) break; // the role chunk, then the first content chunk
    const cancelled = await worker.waitForLog(
      (l) => l.msg === "finished" && String(l.request_id).startsWith(requestId) && l.finish_reason === "abort",
      10_000,
    );
    expect((cancelled.usage as { completion_tokens: number }).completion_tokens).toBeLessThan(200);
    // The concurrency slot comes back (settled without the client, once the worker's final `abort` event has
    // reached the gateway: a few ms after the worker logs it), and the cut-off request is in the ledger.
    const res = await (async () => {
      for (let deadline = Date.now() + 5000; ; await new Promise((r) => setTimeout(r, 50))) {
        try {
          return await openai.completions.create({ model: MODEL, prompt: "a", max_tokens: 1 });
        } catch (e) {
          if (!(e instanceof OpenAI.RateLimitError) || Date.now() > deadline) throw e;
        }
      }
    })();
    expect(res.choices).toHaveLength(1);
    const usage = (await admin(gw, "GET", `/keys/${id}/usage`)) as { totals: Record<string, number> };
    expect(usage.totals.requests).toBe(2);
    // Settled exactly from the worker's final `abort` event, not estimated: what the worker computed is billed.
    const cut = cancelled.usage as { prompt_tokens: number; completion_tokens: number };
    expect(usage.totals.completion_tokens).toBe(cut.completion_tokens + (res.usage?.completion_tokens ?? 0));
    expect(usage.totals.prompt_tokens).toBe(cut.prompt_tokens + (res.usage?.prompt_tokens ?? 0));
    await Promise.all(background);
  });
});

describe("prefix affinity across workers", () => {
  /** Resolves after `count` load reports from `workerId`: by then every connected gateway shard has seen it. */
  async function loadReports(workerId: string, count: number): Promise<{ direct_subject?: unknown }> {
    const nc = await connect({ servers: nats.url });
    try {
      let seen = 0;
      for await (const m of nc.subscribe("llama.pool.default.load")) {
        const report = m.json() as { worker_id: string; direct_subject?: unknown };
        if (report.worker_id === workerId && ++seen === count) return report;
      }
      throw new Error("subscription closed");
    } finally {
      await nc.close();
    }
  }

  it("sends requests sharing a system prompt to the one of two workers that caches it", async () => {
    const second = await startWorkerProcess({ natsUrl: nats.url, pool: "default", workerId: "e2e-w2" });
    try {
      const openai = client((await newKey()).key);
      const system = "You are a storyteller who writes about small animals in the forest. ".repeat(4);
      const ask = (q: string) =>
        openai.chat.completions
          .create({
            model: MODEL,
            messages: [
              { role: "system", content: system },
              { role: "user", content: q },
            ],
            max_tokens: 2,
          })
          .withResponse();
      // The first request connects the gateway's shard for this prefix; two reports later it knows both workers.
      const first = await ask("A fox");
      const report = await loadReports("e2e-w2", 2);
      expect(typeof report.direct_subject).toBe("string"); // the workers take requests addressed to them
      const served = new Set([first.response.headers.get("x-llama-edge-worker")]);
      for (const q of ["A hare", "An owl", "A mole", "A wren", "A newt"]) {
        const { data, response } = await ask(q);
        served.add(response.headers.get("x-llama-edge-worker"));
        expect(data.usage!.prompt_tokens_details?.cached_tokens).toBeGreaterThanOrEqual(16);
      }
      expect(served.size).toBe(1);
      expect(["e2e-w1", "e2e-w2"]).toContain([...served][0]);
    } finally {
      second.kill("SIGTERM");
      await second.exited;
    }
  });
});
