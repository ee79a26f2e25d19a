// Malformed JSON, wrong types, huge bodies, missing/invalid/revoked keys: the right status and OpenAI's error
// shape, never a 500.
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { DurableKeyStore } from "../src/durable/durable-key-store.ts";
import { hashApiKey } from "../src/keys/api-key.ts";
import { UNLIMITED } from "../src/keys/types.ts";
import {
  ADMIN_SECRET,
  bearer,
  instrumented,
  keyStore,
  MODEL,
  makeApp,
  newKey,
  post,
  ScriptedBackend,
  testConfig,
} from "./helpers.ts";

const chat = { model: MODEL, messages: [{ role: "user", content: "Hi" }] };

async function expectError(res: Response, status: number, error: Record<string, unknown>) {
  expect(res.status).toBe(status);
  expect(res.headers.get("content-type")).toContain("application/json");
  const body = (await res.json()) as { error: Record<string, unknown> };
  expect(Object.keys(body)).toEqual(["error"]);
  expect(Object.keys(body.error).sort()).toEqual(["code", "message", "param", "type"]);
  expect(body.error).toMatchObject(error);
  return body.error;
}

describe("request validation", () => {
  it("rejects malformed JSON with 400", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    await expectError(await app.request(post("/v1/chat/completions", key, '{"model": ')), 400, {
      type: "invalid_request_error",
      param: null,
    });
    await expectError(await app.request(post("/v1/chat/completions", key, "")), 400, { type: "invalid_request_error" });
    await expectError(await app.request(post("/v1/completions", key, "[1,2]")), 400, { type: "invalid_request_error" });
  });

  it.each([
    [{ ...chat, temperature: "hot" }, "temperature", "invalid_type"],
    [{ ...chat, max_tokens: 1.5 }, "max_tokens", "invalid_type"],
    [{ ...chat, n: 0 }, "n", "invalid_value"],
    [{ ...chat, stream: "yes" }, "stream", "invalid_type"],
    [{ ...chat, stop: [1] }, "stop[0]", "invalid_type"],
    [{ ...chat, messages: "Hi" }, "messages", "invalid_type"],
    [{ ...chat, messages: [] }, "messages", "invalid_value"],
    [{ ...chat, messages: [{ role: "wizard", content: "x" }] }, "messages[0].role", "invalid_value"],
    [{ ...chat, messages: [{ role: "user", content: 5 }] }, "messages[0].content", "invalid_type"],
    [
      { ...chat, messages: [{ role: "user", content: [{ type: "image_url" }] }] },
      "messages[0].content[0].type",
      "invalid_value",
    ],
    [{ ...chat, logit_bias: { abc: 1 } }, "logit_bias.abc", "invalid_value"],
    [{ ...chat, top_logprobs: 2 }, "top_logprobs", "invalid_value"],
    [{ messages: chat.messages }, "model", "missing_required_parameter"],
    [{ model: MODEL }, "messages", "missing_required_parameter"],
    [{ model: 42, messages: chat.messages }, "model", "invalid_type"],
    // Sampling values the engine cannot compute with: OpenAI's and vLLM's ranges.
    [{ ...chat, temperature: 2.5 }, "temperature", "invalid_value"],
    [{ ...chat, top_p: 0 }, "top_p", "invalid_value"],
    [{ ...chat, repetition_penalty: 0 }, "repetition_penalty", "invalid_value"],
    [{ ...chat, repetition_penalty: 2.5 }, "repetition_penalty", "invalid_value"],
    [{ ...chat, presence_penalty: -3 }, "presence_penalty", "invalid_value"],
    [{ ...chat, frequency_penalty: 2.1 }, "frequency_penalty", "invalid_value"],
    [{ ...chat, min_p: 1.5 }, "min_p", "invalid_value"],
    [{ ...chat, logit_bias: { "42": 101 } }, "logit_bias.42", "invalid_value"],
    [
      { ...chat, logit_bias: Object.fromEntries(Array.from({ length: 301 }, (_, i) => [i, 1])) },
      "logit_bias",
      "invalid_value",
    ],
    [{ ...chat, stop: ["a", "b", "c", "d", "e"] }, "stop", "invalid_value"],
    [{ ...chat, stop: "x".repeat(257) }, "stop", "invalid_value"],
    [{ ...chat, n: 17 }, "n", "invalid_value"],
    [{ ...chat, max_tokens: 4096 }, "max_tokens", "invalid_value"],
    [{ ...chat, max_completion_tokens: 100_000 }, "max_completion_tokens", "invalid_value"],
  ])("rejects %j naming %s", async (body, param, code) => {
    const { app } = makeApp();
    const { key } = await newKey();
    const e = await expectError(await app.request(post("/v1/chat/completions", key, body)), 400, {
      type: "invalid_request_error",
      param,
      code,
    });
    expect(e.message).toContain(param);
  });

  it.each([
    ["repetition_penalty", "1e-320"],
    ["repetition_penalty", "1e999"],
    ["temperature", "1e999"],
    ["top_p", "-1e999"],
  ])("rejects %s: %s (numbers JSON can carry but the engine cannot use)", async (param, value) => {
    const { app } = makeApp();
    const { key } = await newKey();
    const body = `{"model": "${MODEL}", "messages": [{"role": "user", "content": "Hi"}], "${param}": ${value}}`;
    const e = await expectError(await app.request(post("/v1/chat/completions", key, body)), 400, {
      param,
      code: "invalid_value",
    });
    expect(e.message).toContain(param);
  });

  it("caps prompts × n, and refuses at the edge a text prompt that cannot fit any pool", async () => {
    const backend = new ScriptedBackend();
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const many = { model: MODEL, prompt: Array.from({ length: 10 }, (_, i) => `p${i}`), n: 16 };
    const e = await expectError(await app.request(post("/v1/completions", key, many)), 400, { param: "n" });
    expect(e.message).toContain("160");
    // 40 KB of text cannot be fewer than 5000 tokens: the largest pool holds 4096.
    const huge = { model: MODEL, prompt: "word ".repeat(8000) };
    await expectError(await app.request(post("/v1/completions", key, huge)), 400, {
      param: "prompt",
      code: "context_length_exceeded",
    });
    expect(backend.submissions).toHaveLength(0);
    // 20 KB might fit (estimated over 4096 tokens, but not certainly): the largest pool's worker decides.
    const long = { model: MODEL, prompt: "word ".repeat(4000) };
    expect((await app.request(post("/v1/completions", key, long))).status).toBe(200);
    expect(backend.submissions.map((s) => s.pool)).toEqual(["large"]);
  });

  it("validates completions' prompt and parameters", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    await expectError(await app.request(post("/v1/completions", key, { model: MODEL, prompt: { text: "x" } })), 400, {
      param: "prompt",
    });
    await expectError(await app.request(post("/v1/completions", key, { model: MODEL, prompt: [1, -2] })), 400, {
      param: "prompt[1]",
    });
    await expectError(
      await app.request(post("/v1/completions", key, { model: MODEL, prompt: "x", logprobs: 9 })),
      400,
      {
        param: "logprobs",
      },
    );
    await expectError(
      await app.request(post("/v1/completions", key, { model: MODEL, prompt: [1, 2], echo: true })),
      400,
      { param: "echo" },
    );
  });

  it("ignores unknown fields", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    const res = await app.request(
      post("/v1/chat/completions", key, { ...chat, frobnicate: [1, 2, 3], metadata: { a: 1 } }),
    );
    expect(res.status).toBe(200);
  });

  it("rejects huge bodies with 413, by Content-Length and by actual size", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    const huge = JSON.stringify({ ...chat, messages: [{ role: "user", content: "x".repeat(200_000) }] });
    await expectError(await app.request(post("/v1/chat/completions", key, huge)), 413, {
      type: "invalid_request_error",
    });
    // A chunked body (no Content-Length) is cut off while it is read.
    const stream = new ReadableStream<Uint8Array>({
      start(c) {
        for (let i = 0; i < 100; i++) c.enqueue(new TextEncoder().encode("x".repeat(1024)));
        c.close();
      },
    });
    const req = new Request("http://gateway/v1/chat/completions", {
      method: "POST",
      headers: { ...bearer(key), "content-type": "application/json" },
      body: stream,
      // @ts-expect-error: duplex is required for stream bodies in some runtimes
      duplex: "half",
    });
    await expectError(await app.request(req), 413, {});
  });

  it("answers unknown routes with an OpenAI-shaped 404", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    await expectError(await app.request("/v1/engines", { headers: bearer(key) }), 404, {
      type: "invalid_request_error",
    });
  });
});

describe("API keys", () => {
  it("answers 401 without a key", async () => {
    const { app } = makeApp();
    await expectError(await app.request(post("/v1/chat/completions", undefined, chat)), 401, { code: null });
    await expectError(await app.request("/v1/models"), 401, {});
    await expectError(await app.request("/v1/models", { headers: { authorization: "Basic abc" } }), 401, {});
  });

  it("refuses a key whose checksum is wrong with 401, without touching a Durable Object", async () => {
    const { key } = await newKey();
    const keys = instrumented(env.KEYS);
    const { app } = makeApp(undefined, testConfig, { keys: new DurableKeyStore(keys.ns, env.KEY_DIRECTORY) });
    const flipped = key.slice(0, 10) + (key[10] === "a" ? "b" : "a") + key.slice(11); // one typo
    const made_up = `sk-le-${"A".repeat(48)}`;
    for (const wrong of [flipped, made_up, `sk-${"A".repeat(47)}`, "sk-proj-abc"]) {
      await expectError(await app.request(post("/v1/chat/completions", wrong, chat)), 401, { code: "invalid_api_key" });
      await expectError(await app.request("/v1/models", { headers: bearer(wrong) }), 401, { code: "invalid_api_key" });
    }
    expect(keys.counter.gets).toBe(0);
    expect((await app.request(post("/v1/chat/completions", key, chat))).status).toBe(200);
    expect(keys.counter.gets).toBeGreaterThan(0); // the same instrumented store does reach a real key
  });

  it("keeps accepting keys issued before the checksum, unless accept_legacy_keys is off", async () => {
    const legacy = `sk-${"Leg4cyKey".repeat(5)}abc`;
    expect(legacy).toMatch(/^sk-[0-9A-Za-z]{48}$/);
    const hash = await hashApiKey(legacy);
    await env.KEYS.get(env.KEYS.idFromName(hash)).create({
      id: `key_legacy${Date.now()}`,
      object: "api_key",
      name: "old",
      hint: "sk-...Xabc",
      created_at: 0,
      revoked_at: null,
      limits: UNLIMITED,
    });
    expect((await makeApp().app.request(post("/v1/chat/completions", legacy, chat))).status).toBe(200);
    const strict = makeApp(undefined, { ...testConfig, accept_legacy_keys: false }).app;
    await expectError(await strict.request(post("/v1/chat/completions", legacy, chat)), 401, {
      code: "invalid_api_key",
    });
  });

  it("answers 401 invalid_api_key for a wrong key, before looking at the body", async () => {
    const { app } = makeApp();
    const wrong = `sk-${"A".repeat(48)}`;
    for (const body of [chat, "{bad json", { ...chat, temperature: "x" }, { ...chat, model: "nope" }]) {
      const e = await expectError(await app.request(post("/v1/chat/completions", wrong, body)), 401, {
        type: "invalid_request_error",
        code: "invalid_api_key",
      });
      expect(e.message).toContain("sk-...AAAA");
      expect(e.message).not.toContain(wrong);
    }
    await expectError(await app.request("/v1/models", { headers: bearer("not-a-key") }), 401, {
      code: "invalid_api_key",
    });
  });

  it("refuses a revoked key on the very next request", async () => {
    const { app } = makeApp();
    const { key, id } = await newKey();
    expect((await app.request(post("/v1/chat/completions", key, chat))).status).toBe(200);
    const revoke = await app.request(`/admin/keys/${id}`, { method: "DELETE", headers: bearer(ADMIN_SECRET) });
    expect(revoke.status).toBe(200);
    await expectError(await app.request(post("/v1/chat/completions", key, chat)), 401, { code: "invalid_api_key" });
    await expectError(await app.request("/v1/models", { headers: bearer(key) }), 401, { code: "invalid_api_key" });
    expect((await keyStore().get(id))?.revoked_at).toBeTypeOf("number");
  });
});
