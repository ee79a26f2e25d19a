import { NoWorkersError, QueueTimeoutError } from "@llama-edge/shared";
import { describe, expect, it } from "vitest";
import { parseGatewayConfig } from "../src/config.ts";
import {
  bearer,
  chat,
  eventually,
  MODEL,
  makeApp,
  newKey,
  openReservations,
  post,
  ScriptedBackend,
  sseEvents,
} from "./helpers.ts";

describe("chat completions", () => {
  it("answers a non-streaming request with the full object and usage", async () => {
    const { app, backend } = makeApp();
    const { key } = await newKey();
    const res = await app.request(post("/v1/chat/completions", key, chat()));
    expect(res.status).toBe(200);
    const body = (await res.json()) as Record<string, unknown>;
    expect(body).toMatchObject({
      object: "chat.completion",
      model: MODEL,
      choices: [
        { index: 0, message: { role: "assistant", content: "Hello world!" }, finish_reason: "stop", logprobs: null },
      ],
      usage: { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10, prompt_tokens_details: { cached_tokens: 0 } },
    });
    expect(String(body.id)).toMatch(/^chatcmpl-/);
    // As OpenAI's: a request id apart from the completion id. It names the workers' requests (`<id>-<choice>`).
    const requestId = res.headers.get("x-request-id");
    expect(requestId).toMatch(/^req_[0-9A-Za-z]{24}$/);
    expect(backend.submissions[0]!.request.id).toBe(`${requestId}-0`);
    // Never a client's own (it would name the job).
    const traced = await app.request(post("/v1/chat/completions", key, chat(), { "x-request-id": "trace-42" }));
    expect(traced.headers.get("x-request-id")).toMatch(/^req_/);
  });

  it("streams chunks exactly as OpenAI does, with the usage chunk and [DONE]", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    const res = await app.request(
      post("/v1/chat/completions", key, chat({ stream: true, stream_options: { include_usage: true } })),
    );
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("text/event-stream; charset=utf-8");
    expect(res.headers.get("cache-control")).toContain("no-cache");
    expect(res.headers.get("x-accel-buffering")).toBe("no");
    const events = (await sseEvents(res)) as Record<string, unknown>[];
    expect(events.at(-1)).toBe("[DONE]");
    const chunks = events.slice(0, -1);
    for (const c of chunks) {
      expect(c).toMatchObject({ object: "chat.completion.chunk", model: MODEL, id: chunks[0]!.id });
    }
    expect(chunks.map((c) => (c.choices as unknown[])[0] ?? null)).toEqual([
      { index: 0, delta: { role: "assistant", content: "", refusal: null }, logprobs: null, finish_reason: null },
      { index: 0, delta: { content: "Hello" }, logprobs: null, finish_reason: null },
      { index: 0, delta: { content: " world" }, logprobs: null, finish_reason: null },
      { index: 0, delta: { content: "!" }, logprobs: null, finish_reason: null },
      { index: 0, delta: {}, logprobs: null, finish_reason: "stop" },
      null,
    ]);
    // include_usage: usage is null on every chunk but the last, which has empty choices.
    expect(chunks.slice(0, -1).every((c) => c.usage === null)).toBe(true);
    expect(chunks.at(-1)).toMatchObject({
      choices: [],
      usage: { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 },
    });
  });

  it("streams without usage fields unless asked", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    const events = (await sseEvents(
      await app.request(post("/v1/chat/completions", key, chat({ stream: true }))),
    )) as Record<string, unknown>[];
    expect(events.slice(0, -1).every((c) => !("usage" in c))).toBe(true);
  });

  it("runs n choices, each with its own seed, and counts the prompt once", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: ["a", "b"] }));
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const res = await app.request(post("/v1/chat/completions", key, chat({ n: 3, seed: 10 })));
    const body = (await res.json()) as { choices: { index: number }[]; usage: Record<string, number> };
    expect(body.choices.map((c) => c.index)).toEqual([0, 1, 2]);
    expect(body.usage).toMatchObject({ prompt_tokens: 7, completion_tokens: 6 });
    expect(backend.submissions.map((s) => s.request.sampling?.seed).sort()).toEqual([10, 11, 12]);
  });

  it("passes sampling parameters and the messages through, developer as system", async () => {
    const backend = new ScriptedBackend();
    const { app } = makeApp(backend);
    const { key } = await newKey();
    await app.request(
      post("/v1/chat/completions", key, {
        model: MODEL,
        messages: [
          { role: "developer", content: "Be terse." },
          { role: "user", content: [{ type: "text", text: "Hi" }] },
        ],
        temperature: 0.5,
        top_p: 0.9,
        top_k: 40,
        min_p: 0.1,
        repetition_penalty: 1.1,
        stop: "\n",
        max_completion_tokens: 12,
        presence_penalty: 0.5,
        logit_bias: { "42": -100 },
        logprobs: true,
        top_logprobs: 2,
        user: "u-1",
        some_future_field: { ignored: true },
      }),
    );
    const req = backend.submissions[0]!.request;
    expect(req.prompt).toEqual({
      type: "chat",
      messages: [
        { role: "system", content: "Be terse." },
        { role: "user", content: "Hi" },
      ],
      add_generation_prompt: true,
    });
    expect(req.sampling).toEqual({
      temperature: 0.5,
      top_p: 0.9,
      top_k: 40,
      min_p: 0.1,
      repetition_penalty: 1.1,
      presence_penalty: 0.5,
      logit_bias: { "42": -100 },
      max_tokens: 12,
      stop: ["\n"],
      logprobs: true,
      top_logprobs: 2,
    });
  });

  it("returns OpenAI-shaped logprobs", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: ["x"] }));
    // Add logprobs to the scripted deltas.
    const submit = backend.submit.bind(backend);
    backend.submit = (pool, request, options) =>
      (async function* () {
        for await (const ev of submit(pool, request, options)) {
          yield ev.type === "delta"
            ? {
                ...ev,
                logprobs: [
                  { token_id: 5, token: "x", logprob: -0.5, top_logprobs: [{ token_id: 6, token: "y", logprob: -1 }] },
                ],
              }
            : ev;
        }
      })();
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const body = (await (
      await app.request(post("/v1/chat/completions", key, chat({ logprobs: true, top_logprobs: 1 })))
    ).json()) as {
      choices: { logprobs: unknown }[];
    };
    expect(body.choices[0]!.logprobs).toEqual({
      content: [{ token: "x", logprob: -0.5, bytes: [120], top_logprobs: [{ token: "y", logprob: -1, bytes: [121] }] }],
      refusal: null,
    });
  });
});

describe("completions", () => {
  it("numbers choices promptIndex * n + i for several prompts", async () => {
    const backend = new ScriptedBackend((_, r) => ({
      tokens: [r.prompt.type === "text" ? `<${r.prompt.text}>` : "?"],
    }));
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const res = await app.request(post("/v1/completions", key, { model: MODEL, prompt: ["a", "b"], n: 2, echo: true }));
    const body = (await res.json()) as { object: string; choices: { index: number; text: string }[]; usage: object };
    expect(body.object).toBe("text_completion");
    expect(body.choices.map((c) => [c.index, c.text])).toEqual([
      [0, "a<a>"],
      [1, "a<a>"],
      [2, "b<b>"],
      [3, "b<b>"],
    ]);
    expect(body.usage).toMatchObject({ prompt_tokens: 14, completion_tokens: 4 });
    expect(backend.submissions.every((s) => s.request.sampling?.max_tokens === 16)).toBe(true);
  });

  it("accepts token-id prompts and streams text_completion chunks", async () => {
    const backend = new ScriptedBackend();
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const res = await app.request(
      post("/v1/completions", key, { model: MODEL, prompt: [1, 2, 3], stream: true, max_tokens: 5 }),
    );
    const events = (await sseEvents(res)) as Record<string, unknown>[];
    expect(backend.submissions[0]!.request.prompt).toEqual({ type: "tokens", token_ids: [1, 2, 3] });
    expect(events.at(-1)).toBe("[DONE]");
    expect(events.slice(0, -1).map((e) => (e.choices as { text: string; finish_reason: string | null }[])[0])).toEqual([
      { text: "Hello", index: 0, logprobs: null, finish_reason: null },
      { text: " world", index: 0, logprobs: null, finish_reason: null },
      { text: "!", index: 0, logprobs: null, finish_reason: null },
      { text: "", index: 0, logprobs: null, finish_reason: "stop" },
    ]);
    expect((events[0] as { object: string }).object).toBe("text_completion");
  });
});

describe("routing", () => {
  it("sends a prompt to the smallest pool that fits, and longer ones to larger pools", async () => {
    const backend = new ScriptedBackend();
    const { app } = makeApp(backend);
    const { key } = await newKey();
    await app.request(post("/v1/completions", key, { model: MODEL, prompt: "short" }));
    await app.request(post("/v1/completions", key, { model: MODEL, prompt: Array(300).fill(1) }));
    expect(backend.submissions.map((s) => s.pool)).toEqual(["small", "large"]);
  });

  it("gives each pool its own queue timeout: a request may wait that long there for a worker to start it", async () => {
    const config = parseGatewayConfig({
      pools: {
        small: { max_context: 256, models: [MODEL], queue_timeout_ms: 5_000 },
        large: { max_context: 4096, models: [MODEL] },
      },
      request_timeout_ms: 10_000,
    });
    expect(config.pools.large?.queue_timeout_ms, "the default covers a cold start").toBe(600_000);
    const backend = new ScriptedBackend();
    const { app } = makeApp(backend, config);
    const { key } = await newKey();
    const before = Date.now();
    await app.request(post("/v1/completions", key, { model: MODEL, prompt: "short" }));
    await app.request(post("/v1/completions", key, { model: MODEL, prompt: Array(300).fill(1) }));
    const after = Date.now();
    const [small, large] = backend.submissions.map((s) => s.request.deadline ?? 0);
    expect(small).toBeGreaterThanOrEqual(before + 5_000);
    expect(small).toBeLessThanOrEqual(after + 5_000);
    expect(large).toBeGreaterThanOrEqual(before + 600_000);
    expect(large).toBeLessThanOrEqual(after + 600_000);
  });

  it("moves on to a larger pool when a worker finds the prompt too long", async () => {
    const backend = new ScriptedBackend((pool) =>
      pool === "small"
        ? {
            tokens: [],
            error: {
              code: "context_length_exceeded",
              message: "This model's maximum context length is 256 tokens; the prompt has 300 tokens.",
            },
          }
        : { tokens: ["ok"] },
    );
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const res = await app.request(post("/v1/completions", key, { model: MODEL, prompt: "x".repeat(100) }));
    expect(res.status).toBe(200);
    expect(backend.submissions.map((s) => s.pool)).toEqual(["small", "large"]);
  });

  it("fails with context_length_exceeded when no pool can hold the prompt", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    const res = await app.request(post("/v1/completions", key, { model: MODEL, prompt: Array(5000).fill(1) }));
    expect(res.status).toBe(400);
    expect(await res.json()).toMatchObject({
      error: { code: "context_length_exceeded", type: "invalid_request_error", param: "prompt" },
    });
  });

  it("answers 404 model_not_found for a model no pool serves", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    const res = await app.request(post("/v1/chat/completions", key, chat({ model: "gpt-7" })));
    expect(res.status).toBe(404);
    expect(await res.json()).toEqual({
      error: {
        message: "The model 'gpt-7' does not exist or you do not have access to it.",
        type: "invalid_request_error",
        param: "model",
        code: "model_not_found",
      },
    });
  });
});

describe("failures", () => {
  it("answers 503 when no worker pool exists, even for a stream, and releases the reservation", async () => {
    const { app } = makeApp(
      new ScriptedBackend((_, r) => ({ tokens: [], throwBeforeStart: new NoWorkersError("no pool", r.id) })),
    );
    const { key, hash } = await newKey({ max_concurrent: 5 });
    const res = await app.request(post("/v1/chat/completions", key, chat({ stream: true })));
    expect(res.status).toBe(503);
    expect(await res.json()).toMatchObject({ error: { type: "server_error", code: "service_unavailable" } });
    await eventually(async () => (await openReservations(hash)) === 0);
  });

  it("answers 504 when no worker starts the request in time", async () => {
    const { app } = makeApp(
      new ScriptedBackend((_, r) => ({ tokens: [], throwBeforeStart: new QueueTimeoutError("late", r.id) })),
    );
    const { key } = await newKey();
    const res = await app.request(post("/v1/chat/completions", key, chat()));
    expect(res.status).toBe(504);
  });

  it("ends a stream that already began with an SSE error event and no [DONE]", async () => {
    const { app } = makeApp(
      new ScriptedBackend(() => ({
        tokens: ["a", "b", "c"],
        error: { code: "internal", message: "boom", errorAfter: 2 },
      })),
    );
    const { key } = await newKey();
    const res = await app.request(post("/v1/chat/completions", key, chat({ stream: true })));
    expect(res.status).toBe(200);
    const events = (await sseEvents(res)) as Record<string, unknown>[];
    expect(events).not.toContain("[DONE]");
    expect(events.at(-1)).toEqual({
      error: {
        message: "The worker failed while processing the request.",
        type: "server_error",
        param: null,
        code: "internal_error",
      },
    });
  });

  it("cancels the request at the worker when the client cancels the stream, and settles what was used", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: Array(100).fill("t"), delayMs: 20 }));
    const { app } = makeApp(backend);
    const { key, hash } = await newKey({ max_concurrent: 1 });
    const res = await app.request(post("/v1/chat/completions", key, chat({ stream: true })));
    const reader = res.body!.getReader();
    await reader.read(); // role chunk
    await reader.read(); // first token
    await reader.cancel();
    const sub = backend.submissions[0]!;
    await sub.done;
    expect(sub.aborted).toBe(true);
    await eventually(async () => (await openReservations(hash)) === 0);
    // The concurrency slot is free again.
    backend.script = () => ({ tokens: ["ok"] });
    const again = await app.request(post("/v1/chat/completions", key, chat()));
    expect(again.status).toBe(200);
  });

  it("cancels a non-streaming request when the client disconnects", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: Array(100).fill("t"), delayMs: 20 }));
    const { app } = makeApp(backend);
    const { key, hash } = await newKey();
    const ac = new AbortController();
    const pending = Promise.resolve(
      app.request(new Request(post("/v1/chat/completions", key, chat()), { signal: ac.signal })),
    );
    await eventually(() => backend.submissions.length === 1);
    setTimeout(() => ac.abort(), 50);
    await pending.catch(() => undefined);
    await backend.submissions[0]!.done;
    expect(backend.submissions[0]!.aborted).toBe(true);
    await eventually(async () => (await openReservations(hash)) === 0);
  });
});

describe("models", () => {
  it("lists the served models and gets one", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    const list = await app.request("/v1/models", { headers: bearer(key) });
    expect(await list.json()).toEqual({
      object: "list",
      data: [
        { id: MODEL, object: "model", created: 1704067200, owned_by: "llama-edge" },
        { id: "other-model", object: "model", created: 1704067200, owned_by: "llama-edge" },
      ],
    });
    const one = await app.request(`/v1/models/${MODEL}`, { headers: bearer(key) });
    expect(await one.json()).toMatchObject({ id: MODEL, object: "model" });
    const missing = await app.request("/v1/models/nope/x", { headers: bearer(key) });
    expect(missing.status).toBe(404);
    expect(await missing.json()).toMatchObject({ error: { code: "model_not_found" } });
  });

  it("shows a restricted key only its models", async () => {
    const { app } = makeApp();
    const { key } = await newKey({ models: ["other-model"] });
    const list = (await (await app.request("/v1/models", { headers: bearer(key) })).json()) as {
      data: { id: string }[];
    };
    expect(list.data.map((m) => m.id)).toEqual(["other-model"]);
    const res = await app.request(post("/v1/chat/completions", key, chat()));
    expect(res.status).toBe(404);
  });
});

describe("completions logprobs", () => {
  it("returns tokens, token_logprobs, top_logprobs and text_offset", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: ["ab", "c"] }));
    const submit = backend.submit.bind(backend);
    backend.submit = (pool, request, options) =>
      (async function* () {
        for await (const ev of submit(pool, request, options)) {
          yield ev.type === "delta"
            ? {
                ...ev,
                logprobs: [
                  {
                    token_id: 1,
                    token: ev.text,
                    logprob: -1,
                    top_logprobs: [{ token_id: 2, token: "z", logprob: -2 }],
                  },
                ],
              }
            : ev;
        }
      })();
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const res = await app.request(
      post("/v1/completions", key, { model: MODEL, prompt: "Hi ", logprobs: 1, echo: true }),
    );
    const body = (await res.json()) as { choices: { text: string; logprobs: unknown }[] };
    expect(body.choices[0]!.text).toBe("Hi abc");
    expect(body.choices[0]!.logprobs).toEqual({
      tokens: ["ab", "c"],
      token_logprobs: [-1, -1],
      top_logprobs: [{ z: -2 }, { z: -2 }],
      text_offset: [3, 5],
    });
  });
});
