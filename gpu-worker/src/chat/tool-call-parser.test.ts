import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { type ParsedOutput, parseToolCalls, ToolCallParser, type ToolCallPiece } from "./tool-call-parser.ts";

const functions = new Set(["get_weather", "add"]);

/** Feeds `text` in the given chunk sizes and collects everything, end included. */
function run(parser: ToolCallParser, chunks: string[]): ParsedOutput {
  const out: ParsedOutput = { text: "", toolCalls: [] };
  for (const c of [...chunks.map((c) => parser.push(c)), parser.end()]) {
    out.text += c.text;
    out.toolCalls.push(...c.toolCalls);
  }
  return out;
}

/** Pieces joined per call as a client reassembles them (id and name from the first piece). */
function reassemble(pieces: ToolCallPiece[]): { id: string; name: string; arguments: string }[] {
  const calls: { id: string; name: string; arguments: string }[] = [];
  for (const p of pieces) {
    if (p.id !== undefined) calls[p.index] = { id: p.id, name: p.name!, arguments: "" };
    calls[p.index]!.arguments += p.arguments;
  }
  return calls;
}

const split = (text: string, sizes: number[]) => {
  const chunks: string[] = [];
  let i = 0;
  for (let k = 0; i < text.length; k++) {
    const n = Math.max(1, sizes[k % sizes.length]!);
    chunks.push(text.slice(i, i + n));
    i += n;
  }
  return chunks;
};

describe("parseToolCalls (Llama 3.1 JSON)", () => {
  it("reads one or several calls, with parameters or arguments", () => {
    expect(parseToolCalls('{"name": "add", "parameters": {"a": 1, "b": 2}}', functions)).toEqual([
      { name: "add", arguments: '{"a":1,"b":2}' },
    ]);
    expect(
      parseToolCalls(
        ' {"name": "add", "arguments": {}} ; {"parameters": {"city": "Oslo"}, "name": "get_weather"}',
        functions,
      ),
    ).toEqual([
      { name: "add", arguments: "{}" },
      { name: "get_weather", arguments: '{"city":"Oslo"}' },
    ]);
  });

  it("refuses anything else: text, unknown functions, broken JSON, non-object arguments", () => {
    for (const text of [
      "Hello",
      '{"name": "rm_rf", "parameters": {}}',
      '{"name": "add", "parameters": {"a": 1}',
      '{"name": "add", "parameters": [1]}',
      '{"name": "add"}',
      '{"name": "add", "parameters": {}} trailing words',
      "",
    ]) {
      expect(parseToolCalls(text, functions), text).toBeNull();
    }
  });
});

describe("ToolCallParser", () => {
  it("forced: streams the id and name first, then argument pieces that concatenate to the arguments", () => {
    const text =
      '{"name": "get_weather", "parameters": {"city": "S\\"{}ao", "days": [1, {"x": 2}]}}; {"name": "add", "parameters": {}}';
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 9 }), { minLength: 1, maxLength: 8 }), (sizes) => {
        const parser = new ToolCallParser({ mode: "forced", functions, parallel: true });
        const out = run(parser, split(text, sizes));
        expect(out.text).toBe("");
        const calls = reassemble(out.toolCalls);
        expect(calls.map((c) => [c.name, JSON.parse(c.arguments)])).toEqual([
          ["get_weather", { city: 'S"{}ao', days: [1, { x: 2 }] }],
          ["add", {}],
        ]);
        expect(calls[0]!.id).toMatch(/^call_[0-9a-f]{24}$/);
        expect(calls[0]!.id).not.toBe(calls[1]!.id);
        // The first piece of each call carries no arguments yet, as OpenAI streams it.
        expect(out.toolCalls.find((p) => p.index === 0)).toMatchObject({ name: "get_weather", arguments: "" });
        expect(parser.calledTools).toBe(true);
      }),
    );
  });

  it("forced, cut by max_tokens: the call so far, arguments partial", () => {
    const parser = new ToolCallParser({ mode: "forced", functions, parallel: true });
    const out = run(parser, ['{"name": "add", "param', 'eters": {"a": 1']);
    expect(reassemble(out.toolCalls)).toMatchObject([{ name: "add", arguments: '{"a": 1' }]);
  });

  it("auto: text streams as it comes when the answer does not open with {", () => {
    const parser = new ToolCallParser({ mode: "auto", functions, parallel: true });
    expect(parser.push("  ")).toEqual({ text: "", toolCalls: [] });
    expect(parser.push(" Hi")).toEqual({ text: "   Hi", toolCalls: [] });
    expect(parser.push(' {"name": "add"}')).toEqual({ text: ' {"name": "add"}', toolCalls: [] });
    expect(parser.end()).toEqual({ text: "", toolCalls: [] });
    expect(parser.calledTools).toBe(false);
  });

  it("auto: a JSON answer becomes tool calls only when it parses completely, else it is text", () => {
    const calls = new ToolCallParser({ mode: "auto", functions, parallel: true });
    const out = run(calls, ['{"name": "add", "para', 'meters": {"a": 2}}; {"name": "get_weather", "parameters": {}}']);
    expect(out.text).toBe("");
    expect(reassemble(out.toolCalls).map((c) => c.name)).toEqual(["add", "get_weather"]);
    expect(calls.calledTools).toBe(true);

    const json = new ToolCallParser({ mode: "auto", functions, parallel: true });
    expect(run(json, ['{"answer": ', "42}"])).toEqual({ text: '{"answer": 42}', toolCalls: [] });
    expect(json.calledTools).toBe(false);
  });

  it("parallel_tool_calls false keeps the first call only", () => {
    const parser = new ToolCallParser({ mode: "auto", functions, parallel: false });
    const out = run(parser, ['{"name": "add", "parameters": {}}; {"name": "get_weather", "parameters": {}}']);
    expect(reassemble(out.toolCalls).map((c) => c.name)).toEqual(["add"]);
  });
});
