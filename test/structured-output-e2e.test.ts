/**
 * Structured output and tool calling end to end with the official `openai` client: gateway under workerd, NATS,
 * and real `llama-worker serve` processes — the default model (Llama 2 template, no tools) and a Llama 3.1-style
 * GQA model whose template renders tools. Nothing is mocked.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Ajv } from "ajv";
import OpenAI from "openai";
import { zodFunction, zodResponseFormat } from "openai/helpers/zod";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { admin, type Gateway, startGateway } from "../edge/dev/gateway.mjs";
import { ensureToolModel, TOOL_MODEL_NAME } from "../gpu-worker/test/tool-model.ts";
import { startTestNats, type TestNats } from "./helpers/nats-server.ts";
import { startWorkerProcess, type WorkerProcess } from "./helpers/worker-process.ts";

const MODEL = "stories15m-random";

let nats: TestNats;
let workers: WorkerProcess[] = [];
let gw: Gateway;
let stateDir: string;
let openai: OpenAI;

beforeAll(async () => {
  nats = await startTestNats();
  stateDir = mkdtempSync(join(tmpdir(), "llama-edge-so-"));
  const toolModelDir = ensureToolModel();
  let tools: WorkerProcess;
  let plain: WorkerProcess;
  [plain, tools, gw] = await Promise.all([
    startWorkerProcess({ natsUrl: nats.url, pool: "default", workerId: "so-default" }),
    startWorkerProcess({ natsUrl: nats.url, pool: "tools", workerId: "so-tools", args: ["--model", toolModelDir] }),
    startGateway({
      natsWsUrl: nats.wsUrl,
      persistTo: stateDir,
      config: {
        pools: {
          default: { max_context: 256, models: [MODEL] },
          tools: { max_context: 1024, models: [TOOL_MODEL_NAME] },
        },
      },
    }),
  ]);
  workers = [plain, tools];
  const created = await admin(gw, "POST", "/keys", { name: "structured-output", limits: {} });
  openai = new OpenAI({ apiKey: created.key as string, baseURL: `${gw.url}/v1`, maxRetries: 0, timeout: 120_000 });
}, 300_000);

afterAll(async () => {
  await gw?.stop();
  for (const w of workers) w.kill("SIGTERM");
  await Promise.all(workers.map((w) => w.exited));
  await nats?.stop();
  if (stateDir) rmSync(stateDir, { recursive: true, force: true });
});

describe("structured output with the openai client", () => {
  it("chat.completions.parse with a zod response format returns a parsed object", async () => {
    const Person = z.object({
      name: z.string().regex(/^[A-Z][a-z]{1,7}$/),
      age: z.number().int().min(0).max(120),
      pet: z.enum(["cat", "dog"]).nullable(),
    });
    for (const seed of [1, 2, 3]) {
      const res = await openai.chat.completions.parse({
        model: MODEL,
        messages: [{ role: "user", content: "Invent a person." }],
        response_format: zodResponseFormat(Person, "person"),
        seed,
        max_tokens: 120,
      });
      const choice = res.choices[0]!;
      expect(choice.finish_reason).toBe("stop");
      expect(Person.parse(choice.message.parsed)).toEqual(choice.message.parsed);
      expect(choice.message.parsed).toEqual(JSON.parse(choice.message.content!));
    }
  });

  it("json_object on completions, streamed: the concatenated text is one JSON object", async () => {
    const stream = await openai.completions.create({
      model: MODEL,
      prompt: "A JSON object:",
      response_format: { type: "json_object" },
      max_tokens: 200,
      temperature: 0,
      stream: true,
    } as OpenAI.CompletionCreateParamsStreaming);
    let text = "";
    let finish: string | null = null;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.text ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    // A random model rarely closes its strings: when it does not finish, the text is a cut-off prefix.
    if (finish === "stop") expect(JSON.parse(text)).toBeTypeOf("object");
    else expect(finish).toBe("length");
    expect(text.startsWith("{")).toBe(true);
  });

  it("a schema the grammar engine cannot use is a 400 naming response_format", async () => {
    const bad = openai.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "x" }],
      response_format: {
        type: "json_schema",
        json_schema: { name: "t", schema: { type: "string", pattern: "(?=a)b" } },
      },
    });
    await expect(bad).rejects.toBeInstanceOf(OpenAI.BadRequestError);
    await expect(bad).rejects.toMatchObject({ status: 400, param: "response_format.json_schema.schema" });
  });
});

describe("tool calling with the openai client", () => {
  const weather = zodFunction({
    name: "get_weather",
    parameters: z.object({ city: z.string().regex(/^[A-Z][a-z]{2,9}$/), unit: z.enum(["c", "f"]) }),
  });
  const add = zodFunction({
    name: "add",
    parameters: z.object({ a: z.number().int().min(0).max(99), b: z.number().int().min(0).max(99) }),
  });
  const ajv = new Ajv({ strict: false });
  const validators = Object.fromEntries(
    [weather, add].map((t) => [t.function.name, ajv.compile(t.function.parameters as object)]),
  );

  it("a round trip: a required call, the tool's result sent back, then a final answer", async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: "user", content: "What is the weather in Oslo?" }];
    const first = await openai.chat.completions.create({
      model: TOOL_MODEL_NAME,
      messages,
      tools: [weather, add],
      tool_choice: "required",
      parallel_tool_calls: false,
      seed: 7,
      max_tokens: 200,
    });
    const choice = first.choices[0]!;
    expect(choice.finish_reason).toBe("tool_calls");
    expect(choice.message.content).toBeNull();
    const calls = choice.message.tool_calls!;
    expect(calls).toHaveLength(1);
    const call = calls[0]! as OpenAI.ChatCompletionMessageFunctionToolCall;
    expect(call).toMatchObject({ type: "function", id: expect.stringMatching(/^call_/) });
    expect(validators[call.function.name]!(JSON.parse(call.function.arguments))).toBe(true);

    messages.push(choice.message, { role: "tool", tool_call_id: call.id, content: '{"temperature": -3}' });
    const final = await openai.chat.completions.create({
      model: TOOL_MODEL_NAME,
      messages,
      tools: [weather, add],
      seed: 7,
      max_tokens: 16,
    });
    expect(final.choices[0]!.finish_reason).toMatch(/^(stop|length)$/);
    expect(final.choices[0]!.message.tool_calls).toBeUndefined();
    expect(typeof final.choices[0]!.message.content).toBe("string");
    // The tool result was rendered into the prompt: it is longer than the first one by at least the call and result.
    expect(final.usage!.prompt_tokens).toBeGreaterThan(first.usage!.prompt_tokens + 10);
  });

  it("a named function is the one called, with valid arguments", async () => {
    const res = await openai.chat.completions.create({
      model: TOOL_MODEL_NAME,
      messages: [{ role: "user", content: "Add two numbers." }],
      tools: [weather, add],
      tool_choice: { type: "function", function: { name: "add" } },
      seed: 3,
      max_tokens: 100,
    });
    const call = res.choices[0]!.message.tool_calls![0]! as OpenAI.ChatCompletionMessageFunctionToolCall;
    expect(call.function.name).toBe("add");
    expect(validators.add!(JSON.parse(call.function.arguments))).toBe(true);
  });

  it("streamed tool calls reassemble into valid arguments", async () => {
    for (const seed of [11, 12]) {
      const stream = openai.chat.completions.stream({
        model: TOOL_MODEL_NAME,
        messages: [{ role: "user", content: "Weather, please." }],
        tools: [weather, add],
        tool_choice: "required",
        seed,
        max_tokens: 300,
      });
      let pieces = 0;
      stream.on("chunk", (c) => {
        pieces += c.choices[0]?.delta.tool_calls?.length ?? 0;
      });
      const done = await stream.finalChatCompletion();
      const choice = done.choices[0]!;
      expect(pieces).toBeGreaterThan(1);
      const calls = choice.message.tool_calls as OpenAI.ChatCompletionMessageFunctionToolCall[];
      expect(calls.length).toBeGreaterThanOrEqual(1);
      // Every call validates, except a last one max_tokens may have cut.
      const complete = choice.finish_reason === "length" ? calls.slice(0, -1) : calls;
      expect(choice.finish_reason).toMatch(/^(tool_calls|length)$/);
      for (const c of complete) {
        expect(validators[c.function.name]!(JSON.parse(c.function.arguments)), c.function.arguments).toBe(true);
        expect(c.id).toMatch(/^call_/);
      }
    }
  });

  it("tools on a model whose template has none are a clear 400", async () => {
    const bad = openai.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "x" }],
      tools: [weather],
    });
    await expect(bad).rejects.toMatchObject({ status: 400, param: "tools", message: /does not support tools/ });
  });
});

describe("nothing silently dropped", () => {
  it("an unknown field is a 400 naming it, for chat and completions", async () => {
    const chat = openai.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "x" }],
      frobnicate: true,
    } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    await expect(chat).rejects.toBeInstanceOf(OpenAI.BadRequestError);
    await expect(chat).rejects.toMatchObject({ status: 400, param: "frobnicate", code: "unknown_parameter" });
    const completion = openai.completions.create({
      model: MODEL,
      prompt: "x",
      guided_json: {},
    } as OpenAI.CompletionCreateParamsNonStreaming);
    await expect(completion).rejects.toMatchObject({ status: 400, param: "guided_json", code: "unknown_parameter" });
  });

  it("an image part is a 400 naming the part", async () => {
    const bad = openai.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "https://example.com/a.png" } }] }],
    });
    await expect(bad).rejects.toMatchObject({ status: 400, param: "messages[0].content[0].type" });
  });
});
