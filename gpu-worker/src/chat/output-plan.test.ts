// Output options -> grammar + tool-call parser, on the real tokenizers; then tool calls end to end through the
// engine on a Llama 3.1-style GQA model (byte-level vocabulary).
import { Ajv } from "ajv";
import { beforeAll, describe, expect, it } from "vitest";
import { ensureToolModel } from "../../test/tool-model.ts";
import { LLMEngine } from "../engine/llm-engine.ts";
import { ensureDefaultModel } from "../model/default-model.ts";
import { ChatTemplateError, type ChatTool, LlamaTokenizer } from "../tokenizer/tokenizer.ts";
import { OutputRequestError, planOutput, type ServedEvent, withToolCalls } from "./output-plan.ts";

const tools: ChatTool[] = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "Current weather of a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string", pattern: "^[A-Z][a-z]{2,9}$" }, unit: { enum: ["c", "f"] } },
        required: ["city", "unit"],
      },
    },
  },
  {
    type: "function",
    function: {
      name: "add",
      parameters: { properties: { a: { type: "integer", minimum: 0, maximum: 99 } }, required: ["a"] },
    },
  },
];

let llama2: LlamaTokenizer;
let toolDir: string;
let llama31: LlamaTokenizer;
beforeAll(async () => {
  llama2 = LlamaTokenizer.fromDir(await ensureDefaultModel());
  toolDir = ensureToolModel();
  llama31 = LlamaTokenizer.fromDir(toolDir);
}, 120_000);

describe("planOutput", () => {
  it("turns response_format into a grammar, and text into none", () => {
    expect(planOutput(llama2, { responseFormat: { type: "json_object" } }, undefined)).toMatchObject({
      grammar: { type: "json_object" },
      toolCalls: null,
    });
    const schema = { type: "object", properties: { x: { type: "integer" } } };
    expect(planOutput(llama2, { responseFormat: { type: "json_schema", schema } }, undefined).grammar).toEqual({
      type: "json_schema",
      schema,
    });
    expect(planOutput(llama2, { responseFormat: { type: "text" } }, undefined)).toEqual({ toolCalls: null });
  });

  it("required: one or more calls of any offered function; named: that one; none: plain text", () => {
    const required = planOutput(llama31, { toolChoice: "required" }, tools);
    expect(required.grammar).toMatchObject({ type: "json_schema", separator: "; " });
    expect(planOutput(llama31, { toolChoice: "required", parallelToolCalls: false }, tools).grammar).not.toHaveProperty(
      "separator",
    );
    const named = planOutput(llama31, { toolChoice: { name: "add" } }, tools);
    expect(named.grammar).toMatchObject({
      schema: { properties: { name: { const: "add" }, parameters: { type: "object" } } },
    });
    const auto = planOutput(llama31, { toolChoice: "auto" }, tools);
    expect(auto.grammar).toBeUndefined();
    expect(auto.toolCalls).not.toBeNull();
    expect(planOutput(llama31, { toolChoice: "none" }, tools)).toEqual({ toolCalls: null });
  });

  it("refuses contradictions, naming the field", () => {
    const cases: [Parameters<typeof planOutput>, string][] = [
      [[llama31, { toolChoice: "required" }, undefined], "tool_choice"],
      [[llama31, { toolChoice: { name: "nope" } }, tools], "tool_choice"],
      [[llama31, { toolChoice: "required", responseFormat: { type: "json_object" } }, tools], "response_format"],
      [[llama2, { toolChoice: "auto" }, tools], "tool_choice"], // no parser for Llama 2's family
      [
        [llama31, {}, [{ type: "function", function: { name: "f", parameters: { type: "array" } } }]],
        "tools[0].function.parameters",
      ],
    ];
    for (const [args, param] of cases) {
      let err: unknown;
      try {
        planOutput(...args);
      } catch (e) {
        err = e;
      }
      expect(err, param).toBeInstanceOf(OutputRequestError);
      expect((err as OutputRequestError).param).toBe(param);
    }
  });

  it("a template without tool support refuses tools, tool calls and tool results", () => {
    const user = { role: "user" as const, content: "Hi" };
    expect(() => llama2.encodeChat([user], { tools })).toThrow(ChatTemplateError);
    expect(() => llama2.encodeChat([user], { tools })).toThrow(/does not support tools/);
    expect(() => llama2.encodeChat([user, { role: "tool", content: "1", tool_call_id: "c" }])).toThrow(
      ChatTemplateError,
    );
  });
});

describe("tool calls through the engine (Llama 3.1 format, GQA, byte-level vocabulary)", () => {
  let engine: LLMEngine;
  beforeAll(async () => {
    engine = await LLMEngine.create({ modelDir: toolDir, maxNumSeqs: 8 });
  }, 300_000);

  async function call(toolChoice: "required" | { name: string }, seed: number, parallelToolCalls = false) {
    const plan = planOutput(llama31, { toolChoice, parallelToolCalls }, tools);
    const events: ServedEvent[] = [];
    const stream = engine.submit({
      requestId: `t${seed}-${JSON.stringify(toolChoice)}-${parallelToolCalls}`,
      prompt: llama31.encodeChat([{ role: "user", content: "Weather in Oslo?" }], { tools }),
      sampling: { temperature: 1, seed, maxTokens: 200 },
      grammar: plan.grammar,
    });
    for await (const ev of withToolCalls(stream, plan.toolCalls!)) events.push(ev);
    return events;
  }

  const ajv = new Ajv();
  const validators = new Map(tools.map((t) => [t.function.name, ajv.compile(t.function.parameters as object)]));

  it("required and named calls always name an offered function with arguments that validate", async () => {
    for (let seed = 0; seed < 6; seed++) {
      for (const choice of ["required", { name: "add" }] as const) {
        const events = await call(choice, seed);
        const final = events.at(-1)!;
        expect(final).toMatchObject({ type: "final", finishReason: "tool_calls" });
        const pieces = events.flatMap((e) => (e.type === "delta" ? (e.toolCalls ?? []) : []));
        expect(events.every((e) => e.type !== "delta" || e.text === "")).toBe(true); // no text leaks out
        const first = pieces[0]!;
        expect(first).toMatchObject({ index: 0, arguments: "" });
        if (typeof choice === "object") expect(first.name).toBe("add");
        const args = JSON.parse(pieces.map((p) => p.arguments).join(""));
        expect(validators.get(first.name!)!(args), JSON.stringify(args)).toBe(true);
        expect(new Set(pieces.map((p) => p.index))).toEqual(new Set([0]));
      }
    }
  });

  it("parallel required calls are separate, each valid", async () => {
    const events = await call("required", 3, true);
    const calls: { name: string; args: string }[] = [];
    for (const e of events) {
      for (const p of e.type === "delta" ? (e.toolCalls ?? []) : []) {
        if (p.name) calls[p.index] = { name: p.name, args: "" };
        calls[p.index]!.args += p.arguments;
      }
    }
    expect(calls.length).toBeGreaterThanOrEqual(1);
    const last = events.at(-1) as Extract<ServedEvent, { type: "final" }>;
    // Every complete call validates; only a call cut by max_tokens may be partial.
    for (const [i, c] of calls.entries()) {
      if (i === calls.length - 1 && last.finishReason === "length") continue;
      expect(validators.get(c.name)!(JSON.parse(c.args))).toBe(true);
    }
  });
});
