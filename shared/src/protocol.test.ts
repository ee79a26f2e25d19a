import { describe, expect, test } from "vitest";
import {
  directSubject,
  MAX_REQUEST_BYTES,
  PROTOCOL_VERSION,
  parseReplyMessage,
  parseRequestMessage,
  poolNames,
  type RequestMessage,
} from "./protocol.ts";

const enc = (v: unknown) => new TextEncoder().encode(typeof v === "string" ? v : JSON.stringify(v));

const valid: RequestMessage = {
  v: PROTOCOL_VERSION,
  id: "req-1",
  model: "m",
  prompt: { type: "text", text: "hi" },
  sampling: { temperature: 0, max_tokens: 4 },
  deadline: Date.now() + 1000,
  reply_to: "_INBOX.abc.def",
};

describe("pool names", () => {
  test("are derived from the pool name, the same for every user", () => {
    expect(poolNames("long-context")).toEqual({
      stream: "llama-pool-long-context",
      consumer: "llama-workers-long-context",
      requests: "llama.pool.long-context.requests",
      load: "llama.pool.long-context.load",
      cancel: "llama.pool.long-context.cancel",
      direct: "llama.pool.long-context.worker.*",
    });
    expect(directSubject("long-context", "ab12")).toBe("llama.pool.long-context.worker.ab12");
    expect(() => directSubject("default", "a.b")).toThrow(TypeError);
  });

  test("reject names that would break subjects or stream names", () => {
    for (const bad of ["", "A", "a.b", "a*", "a b", "a>", "x".repeat(65)])
      expect(() => poolNames(bad)).toThrow(TypeError);
  });
});

describe("parseRequestMessage", () => {
  test("accepts a valid request, fills defaults and ignores unknown fields", () => {
    const r = parseRequestMessage(enc({ ...valid, sampling: undefined, future_field: 1 }));
    expect(r.ok && r.value.sampling).toEqual({});
    expect(r.ok && "future_field" in r.value).toBe(false);
  });

  test("checks the version before the schema", () => {
    expect(parseRequestMessage(enc({ v: 2, id: "x", reply_to: "r" }))).toMatchObject({
      ok: false,
      code: "unsupported_version",
      id: "x",
      replyTo: "r",
    });
  });

  test("recovers id and reply subject only when they are well-formed", () => {
    expect(parseRequestMessage(enc({ ...valid, model: 7 }))).toMatchObject({
      code: "bad_request",
      replyTo: valid.reply_to,
    });
    const wildcard = parseRequestMessage(enc({ ...valid, reply_to: "_INBOX.>" }));
    expect(wildcard).toMatchObject({ ok: false, code: "bad_request" });
    expect(wildcard.ok || wildcard.replyTo).toBeUndefined();
  });

  test("rejects non-JSON, non-objects, invalid UTF-8 and oversized messages without throwing", () => {
    expect(parseRequestMessage(enc("{"))).toMatchObject({ ok: false, code: "bad_request" });
    expect(parseRequestMessage(enc([1]))).toMatchObject({ ok: false, code: "bad_request" });
    expect(parseRequestMessage(new Uint8Array([0xff, 0xfe]))).toMatchObject({ ok: false, code: "bad_request" });
    const big = enc({ ...valid, prompt: { type: "text", text: "x".repeat(MAX_REQUEST_BYTES) } });
    expect(parseRequestMessage(big)).toMatchObject({ ok: false, code: "too_large", id: "req-1" });
  });

  test("validates sampling ranges and prompt kinds", () => {
    const bad = [
      { ...valid, sampling: { top_p: 0 } },
      { ...valid, sampling: { logit_bias: { abc: 1 } } },
      { ...valid, sampling: { top_logprobs: 21 } },
      { ...valid, prompt: { type: "tokens", token_ids: [] } },
      { ...valid, prompt: { type: "chat", messages: [{ role: "robot", content: "hi" }] } },
      { ...valid, id: "has space" },
    ];
    for (const m of bad) expect(parseRequestMessage(enc(m)).ok, JSON.stringify(m)).toBe(false);
    const chat = parseRequestMessage(
      enc({ ...valid, prompt: { type: "chat", messages: [{ role: "user", content: "hi" }] } }),
    );
    expect(chat.ok && chat.value.prompt).toEqual({
      type: "chat",
      messages: [{ role: "user", content: "hi" }],
      add_generation_prompt: true,
    });
  });
});

describe("structured output and tools in the protocol", () => {
  const tools = [{ type: "function", function: { name: "get_weather", parameters: { type: "object" } } }];
  const call = { id: "call_1", type: "function", function: { name: "get_weather", arguments: "{}" } };

  test("a request carries response_format, tools, tool_choice and tool-call history", () => {
    const r = parseRequestMessage(
      enc({
        ...valid,
        prompt: {
          type: "chat",
          messages: [
            { role: "user", content: "Weather?" },
            { role: "assistant", content: null, tool_calls: [call] },
            { role: "tool", content: "sunny", tool_call_id: "call_1" },
          ],
          tools,
        },
        tool_choice: { type: "function", function: { name: "get_weather" } },
        parallel_tool_calls: false,
        response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "object" } } },
      }),
    );
    expect(r.ok).toBe(true);
    if (!r.ok || r.value.prompt.type !== "chat") return;
    expect(r.value.prompt.tools).toEqual(tools);
    expect(r.value.prompt.messages[1]!.tool_calls).toEqual([call]);
    expect(r.value).toMatchObject({ parallel_tool_calls: false, tool_choice: { function: { name: "get_weather" } } });
  });

  test("rejects malformed tools and formats", () => {
    const bad = [
      { ...valid, response_format: { type: "xml" } },
      { ...valid, tool_choice: "sometimes" },
      {
        ...valid,
        prompt: {
          type: "chat",
          messages: [{ role: "user", content: "x" }],
          tools: [{ type: "function", function: { name: "a b" } }],
        },
      },
    ];
    for (const m of bad) expect(parseRequestMessage(enc(m)).ok, JSON.stringify(m)).toBe(false);
  });

  test("events carry tool-call pieces, finish_reason tool_calls and the param at fault", () => {
    const base = { v: PROTOCOL_VERSION, id: "r", seq: 1 };
    const piece = { index: 0, id: "call_1", name: "get_weather", arguments: "" };
    expect(parseReplyMessage(enc({ ...base, type: "delta", text: "", token_ids: [5], tool_calls: [piece] })).ok).toBe(
      true,
    );
    const usage = { prompt_tokens: 1, completion_tokens: 1, cached_tokens: 0 };
    expect(parseReplyMessage(enc({ ...base, type: "final", finish_reason: "tool_calls", usage })).ok).toBe(true);
    const err = parseReplyMessage(enc({ ...base, type: "error", code: "bad_request", message: "x", param: "tools" }));
    expect(err.ok && err.value).toMatchObject({ param: "tools" });
  });
});

describe("parseReplyMessage", () => {
  test("accepts every event kind and claims; rejects unknown types and bad codes", () => {
    const base = { v: PROTOCOL_VERSION, id: "r", seq: 0 };
    expect(parseReplyMessage(enc({ ...base, type: "heartbeat" })).ok).toBe(true);
    expect(parseReplyMessage(enc({ v: 1, type: "claim", id: "r", worker_id: "w" })).ok).toBe(true);
    expect(parseReplyMessage(enc({ ...base, type: "error", code: "internal", message: "x" })).ok).toBe(true);
    expect(parseReplyMessage(enc({ ...base, type: "error", code: "teapot", message: "x" })).ok).toBe(false);
    expect(parseReplyMessage(enc({ ...base, type: "gossip" })).ok).toBe(false);
    expect(parseReplyMessage(enc({ ...base, seq: -1, type: "heartbeat" })).ok).toBe(false);
  });
});
