// response_format, tools and tool calls at the gateway: what reaches the workers, how tool calls come back
// (exactly OpenAI's shapes, streaming and not), and the 400s: unknown fields, unsupported content parts,
// contradictory tool options. Nothing a client sends is dropped silently.
import type { ToolCallDelta } from "@llama-edge/shared";
import { describe, expect, it } from "vitest";
import { chat, MODEL, makeApp, newKey, post, ScriptedBackend, sseEvents } from "./helpers.ts";

const tools = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "Weather of a city",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    },
  },
];

async function expect400(body: unknown, param: string, code: string, path = "/v1/chat/completions") {
  const { app } = makeApp();
  const { key } = await newKey();
  const res = await app.request(post(path, key, body));
  expect(res.status).toBe(400);
  const { error } = (await res.json()) as { error: Record<string, unknown> };
  expect(error).toMatchObject({ type: "invalid_request_error", param, code });
  expect(error.message).toContain(param);
  return error;
}

describe("unknown fields and unsupported parts", () => {
  it.each([
    ["/v1/chat/completions", chat({ frobnicate: 1 }), "frobnicate"],
    ["/v1/chat/completions", chat({ functions: [] }), "functions"],
    ["/v1/chat/completions", chat({ messages: [{ role: "user", content: "x", mood: "happy" }] }), "messages[0].mood"],
    ["/v1/chat/completions", chat({ stream_options: { include_usage: true, extra: 1 } }), "stream_options.extra"],
    [
      "/v1/chat/completions",
      chat({ response_format: { type: "json_object", strict: true } }),
      "response_format.strict",
    ],
    ["/v1/chat/completions", chat({ tools: [{ ...tools[0], extra: 1 }] }), "tools[0].extra"],
    [
      "/v1/chat/completions",
      chat({ messages: [{ role: "user", content: [{ type: "text", text: "x", cache_control: {} }] }] }),
      "messages[0].content[0].cache_control",
    ],
    ["/v1/completions", { model: MODEL, prompt: "x", frobnicate: 1 }, "frobnicate"],
    ["/v1/completions", { model: MODEL, prompt: "x", tools }, "tools"],
  ])("%s: an unknown field is a 400 naming it (%j)", async (path, body, param) => {
    const e = await expect400(body, param, "unknown_parameter", path);
    expect(e.message).toBe(`Unknown parameter: '${param}'.`);
  });

  it("keeps accepting the documented vLLM extras", async () => {
    const backend = new ScriptedBackend();
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const extras = { top_k: 5, min_p: 0.1, repetition_penalty: 1.1, ignore_eos: true, stop_token_ids: [2] };
    for (const path of ["/v1/chat/completions", "/v1/completions"]) {
      const body = path.includes("chat") ? chat(extras) : { model: MODEL, prompt: "x", ...extras };
      expect((await app.request(post(path, key, body))).status).toBe(200);
    }
    expect(backend.submissions[0]!.request.sampling).toMatchObject({ top_k: 5, ignore_eos: true });
  });

  it.each([
    ["image_url", { type: "image_url", image_url: { url: "https://x/y.png" } }],
    ["input_audio", { type: "input_audio", input_audio: { data: "AAAA", format: "wav" } }],
    ["file", { type: "file", file: { file_id: "f" } }],
  ])("a %s content part is a 400 naming the part", async (type, part) => {
    const body = chat({ messages: [{ role: "user", content: [{ type: "text", text: "look" }, part] }] });
    const e = await expect400(body, "messages[0].content[1].type", "invalid_value");
    expect(e.message).toContain(`'${type}'`);
  });
});

describe("response_format", () => {
  it("passes json_object and json_schema to the workers, on chat and completions", async () => {
    const backend = new ScriptedBackend(() => ({ tokens: ['{"a": 1}'] }));
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const schema = { type: "object", properties: { a: { type: "integer" } }, required: ["a"] };
    const format = { type: "json_schema", json_schema: { name: "thing", schema, strict: true } };
    const res = await app.request(post("/v1/chat/completions", key, chat({ response_format: format })));
    expect(((await res.json()) as { choices: { message: { content: string } }[] }).choices[0]!.message.content).toBe(
      '{"a": 1}',
    );
    await app.request(
      post("/v1/completions", key, { model: MODEL, prompt: "x", response_format: { type: "json_object" } }),
    );
    expect(backend.submissions.map((s) => s.request.response_format)).toEqual([format, { type: "json_object" }]);
  });

  it("rejects a malformed response_format naming the field", async () => {
    await expect400(chat({ response_format: { type: "xml" } }), "response_format.type", "invalid_value");
    await expect400(
      chat({ response_format: { type: "json_schema", json_schema: { schema: {} } } }),
      "response_format.json_schema.name",
      "missing_required_parameter",
    );
  });
});

describe("tools", () => {
  it("sends tools, tool_choice, parallel_tool_calls and tool-call history to the workers", async () => {
    const backend = new ScriptedBackend();
    const { app } = makeApp(backend);
    const { key } = await newKey();
    const call = { id: "call_1", type: "function", function: { name: "get_weather", arguments: '{"city":"Oslo"}' } };
    const messages = [
      { role: "user", content: "Weather in Oslo?", name: "ann" },
      { role: "assistant", content: null, tool_calls: [call], refusal: null },
      { role: "tool", tool_call_id: "call_1", content: [{ type: "text", text: "-3 C" }] },
    ];
    const choice = { type: "function", function: { name: "get_weather" } };
    expect(
      (
        await app.request(
          post("/v1/chat/completions", key, chat({ messages, tools, tool_choice: choice, parallel_tool_calls: false })),
        )
      ).status,
    ).toBe(200);
    const req = backend.submissions[0]!.request;
    expect(req.prompt).toEqual({
      type: "chat",
      messages: [
        { role: "user", content: "Weather in Oslo?", name: "ann" },
        { role: "assistant", content: null, tool_calls: [call] },
        { role: "tool", content: "-3 C", tool_call_id: "call_1" },
      ],
      add_generation_prompt: true,
      tools,
    });
    expect(req).toMatchObject({ tool_choice: choice, parallel_tool_calls: false });
  });

  it.each([
    [chat({ tool_choice: "required" }), "tool_choice", "invalid_value"],
    [chat({ parallel_tool_calls: true }), "parallel_tool_calls", "invalid_value"],
    [chat({ tools, tool_choice: { type: "function", function: { name: "nope" } } }), "tool_choice", "invalid_value"],
    [chat({ tools, response_format: { type: "json_object" } }), "response_format", "invalid_value"],
    [chat({ tools: [] }), "tools", "invalid_value"],
    [
      chat({ tools: [{ type: "function", function: { name: "bad name!" } }] }),
      "tools[0].function.name",
      "invalid_value",
    ],
    [chat({ messages: [{ role: "tool", content: "x" }] }), "messages[0].tool_call_id", "missing_required_parameter"],
    [chat({ messages: [{ role: "user", content: null }] }), "messages[0].content", "invalid_type"],
    [
      chat({
        messages: [
          {
            role: "user",
            content: "x",
            tool_calls: [{ id: "c", type: "function", function: { name: "f", arguments: "{}" } }],
          },
        ],
      }),
      "messages[0].tool_calls",
      "invalid_value",
    ],
  ])("rejects %j naming %s", async (body, param, code) => {
    await expect400(body, param, code);
  });

  it("allows response_format with tool_choice none", async () => {
    const { app } = makeApp();
    const { key } = await newKey();
    const body = chat({ tools, tool_choice: "none", response_format: { type: "json_object" } });
    expect((await app.request(post("/v1/chat/completions", key, body))).status).toBe(200);
  });
});

/** A worker that answers with one get_weather call in pieces. */
function toolCallingBackend() {
  const pieces: ToolCallDelta[][] = [
    [
      { index: 0, id: "call_abc", name: "get_weather", arguments: "" },
      { index: 0, arguments: '{"ci' },
    ],
    [{ index: 0, arguments: 'ty": "Oslo"}' }],
  ];
  return new ScriptedBackend(() => ({ tokens: ["", ""], toolCalls: pieces, finish: "tool_calls" }));
}

describe("tool calls in responses", () => {
  it("non-streaming: message.tool_calls, content null, finish_reason tool_calls", async () => {
    const { app } = makeApp(toolCallingBackend());
    const { key } = await newKey();
    const res = await app.request(post("/v1/chat/completions", key, chat({ tools })));
    const body = (await res.json()) as { choices: unknown[] };
    expect(body.choices[0]).toEqual({
      index: 0,
      message: {
        role: "assistant",
        content: null,
        refusal: null,
        tool_calls: [
          { id: "call_abc", type: "function", function: { name: "get_weather", arguments: '{"city": "Oslo"}' } },
        ],
      },
      logprobs: null,
      finish_reason: "tool_calls",
    });
  });

  it("streaming: the id, type and name in the first piece, argument pieces after, as OpenAI streams them", async () => {
    const { app } = makeApp(toolCallingBackend());
    const { key } = await newKey();
    const res = await app.request(post("/v1/chat/completions", key, chat({ tools, stream: true })));
    const events = (await sseEvents(res)) as (
      | { choices: { delta: unknown; finish_reason: string | null }[] }
      | string
    )[];
    expect(events.at(-1)).toBe("[DONE]");
    const deltas = events.slice(0, -1).map((e) => (e as { choices: { delta: unknown }[] }).choices[0]!.delta);
    expect(deltas).toEqual([
      { role: "assistant", content: "", refusal: null },
      {
        tool_calls: [
          { index: 0, id: "call_abc", type: "function", function: { name: "get_weather", arguments: "" } },
          { index: 0, function: { arguments: '{"ci' } },
        ],
      },
      { tool_calls: [{ index: 0, function: { arguments: 'ty": "Oslo"}' } }] },
      {},
    ]);
    const last = events.at(-2) as { choices: { finish_reason: string }[] };
    expect(last.choices[0]!.finish_reason).toBe("tool_calls");
  });
});
