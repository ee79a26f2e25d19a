/**
 * What a request asks of its output, turned into what the engine enforces and how the text is read back:
 * `response_format` becomes a grammar; `tools` with `tool_choice` become a grammar over the allowed functions
 * (`required`, a named function) and/or a tool-call parser (`required`, named, `auto`).
 *
 * Tool-call formats per chat-template family (the parser, see tool-call-parser.ts):
 * - Llama 3.1+ (a template that reads `tools`, a vocabulary with `<|start_header_id|>`): JSON calls,
 *   `{"name": ..., "parameters": {...}}`, several joined by "; ". `auto` reads the model's own output this way.
 * - any other template that reads `tools`: `required` and named functions work (the grammar writes the same JSON
 *   calls); `auto` is refused, since no parser for the family's own format exists here.
 * - a template that does not read `tools`: tools are refused (400).
 *
 * @module
 */
import type { GrammarSpec, JsonSchema } from "../engine/grammar.ts";
import type { EngineEvent, FinishReason } from "../engine/types.ts";
import type { ChatTool, LlamaTokenizer } from "../tokenizer/tokenizer.ts";
import { ToolCallParser, type ToolCallPiece } from "./tool-call-parser.ts";

export type ResponseFormat =
  | { type: "text" }
  | { type: "json_object" }
  /** schema absent: any JSON value. */
  | { type: "json_schema"; schema?: JsonSchema };

/** OpenAI's tool_choice, with a named function as `{ name }`. */
export type ToolChoice = "none" | "auto" | "required" | { name: string };

export interface OutputRequest {
  responseFormat?: ResponseFormat;
  /** Default: auto when tools are given. */
  toolChoice?: ToolChoice;
  /** Default true. */
  parallelToolCalls?: boolean;
}

export interface OutputPlan {
  grammar?: GrammarSpec;
  /** The request field the grammar comes from, for errors compiling it. */
  grammarParam?: string;
  /** Reads tool calls out of the output; null when none can come (no tools, or tool_choice none). */
  toolCalls: ToolCallParser | null;
}

/** An engine event as the worker serves it: text deltas may carry tool-call pieces, and a turn may end in calls. */
export type ServedEvent =
  | (Extract<EngineEvent, { type: "delta" }> & { toolCalls?: ToolCallPiece[] })
  | (Omit<Extract<EngineEvent, { type: "final" }>, "finishReason"> & { finishReason: FinishReason | "tool_calls" });

/** A request whose output options contradict each other or the model; `param` names the field. */
export class OutputRequestError extends Error {
  override name = "OutputRequestError";
  constructor(
    message: string,
    readonly param: string,
  ) {
    super(message);
  }
}

/** Separator of parallel calls in the Llama 3.1 JSON format. */
const CALL_SEPARATOR = "; ";

/** Whether the model's family writes Llama 3.1+ JSON tool calls (its header tokens are in the vocabulary). */
const speaksLlama3Json = (tokenizer: LlamaTokenizer) => tokenizer.tokenToId("<|start_header_id|>") !== undefined;

/** The arguments schema of a tool: an object schema (OpenAI's rule), `type: "object"` added when left implicit. */
function argumentsSchema(tool: ChatTool, i: number): JsonSchema {
  const p = tool.function.parameters;
  if (p === undefined) return { type: "object", properties: {} };
  if (typeof p !== "object" || p === null || Array.isArray(p) || ("type" in p && p.type !== "object")) {
    throw new OutputRequestError(
      `tools[${i}].function.parameters must be a JSON schema of type "object"`,
      `tools[${i}].function.parameters`,
    );
  }
  return { type: "object", ...(p as Record<string, unknown>) };
}

/** One call of `tool`, as the grammar writes it: its name, then its arguments. */
function callSchema(tool: ChatTool, i: number): JsonSchema {
  return {
    type: "object",
    properties: { name: { const: tool.function.name }, parameters: argumentsSchema(tool, i) },
    required: ["name", "parameters"],
  };
}

/**
 * @throws OutputRequestError for contradictory options (tool_choice without tools, an unknown function,
 *   response_format together with tool calls, `auto` on a family without a parser).
 * @example
 * planOutput(tokenizer, { responseFormat: { type: "json_object" } }, undefined).grammar // { type: "json_object" }
 */
export function planOutput(tokenizer: LlamaTokenizer, req: OutputRequest, tools: ChatTool[] | undefined): OutputPlan {
  const format = req.responseFormat ?? { type: "text" };
  const formatGrammar: GrammarSpec | undefined =
    format.type === "json_object"
      ? { type: "json_object" }
      : format.type === "json_schema"
        ? { type: "json_schema", schema: format.schema ?? true }
        : undefined;
  const formatPlan: OutputPlan = formatGrammar
    ? { grammar: formatGrammar, grammarParam: "response_format.json_schema.schema", toolCalls: null }
    : { toolCalls: null };
  if (!tools?.length) {
    if (req.toolChoice !== undefined && req.toolChoice !== "none") {
      throw new OutputRequestError("tool_choice is only allowed when tools are given", "tool_choice");
    }
    return formatPlan;
  }
  const calls = tools.map(callSchema); // checks every tool's parameters, whatever the choice
  const choice = req.toolChoice ?? "auto";
  if (choice === "none") return formatPlan;
  if (formatGrammar) {
    throw new OutputRequestError(
      `response_format ${format.type} cannot be combined with tool calls (tool_choice "none" allows it)`,
      "response_format",
    );
  }
  const parallel = req.parallelToolCalls ?? true;
  const functions = new Set(tools.map((t) => t.function.name));
  if (choice === "auto") {
    if (!speaksLlama3Json(tokenizer)) {
      throw new OutputRequestError(
        'tool_choice "auto" needs a tool-call parser for this model\'s chat template family (supported: Llama 3.1+ JSON); use "required" or a named function',
        "tool_choice",
      );
    }
    return { toolCalls: new ToolCallParser({ mode: "auto", functions, parallel }) };
  }
  let schema: JsonSchema;
  let separator: string | undefined;
  if (choice === "required") {
    schema = { anyOf: calls };
    if (parallel) separator = CALL_SEPARATOR;
  } else {
    const i = tools.findIndex((t) => t.function.name === choice.name);
    if (i < 0) throw new OutputRequestError(`tool_choice names ${choice.name}, which is not in tools`, "tool_choice");
    schema = calls[i]!;
  }
  return {
    grammar: { type: "json_schema", schema, ...(separator ? { separator } : {}) },
    grammarParam: "tools",
    toolCalls: new ToolCallParser({ mode: "forced", functions, parallel }),
  };
}

/** The engine's events with tool calls read out of their text; the turn ends in `tool_calls` when it made some. */
export async function* withToolCalls(
  events: AsyncIterable<EngineEvent>,
  parser: ToolCallParser,
): AsyncGenerator<ServedEvent> {
  for await (const ev of events) {
    if (ev.type === "delta") {
      const { text, toolCalls } = parser.push(ev.text);
      yield { ...ev, text, ...(toolCalls.length ? { toolCalls } : {}) };
      continue;
    }
    const rest = parser.end();
    if (rest.text || rest.toolCalls.length) {
      yield {
        type: "delta",
        text: rest.text,
        tokenIds: [],
        ...(rest.toolCalls.length ? { toolCalls: rest.toolCalls } : {}),
      };
    }
    yield ev.finishReason === "stop" && parser.calledTools ? { ...ev, finishReason: "tool_calls" } : ev;
  }
}
