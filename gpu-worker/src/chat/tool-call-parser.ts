/**
 * Tool calls out of a model's text, in the Llama 3.1+ JSON format (what vLLM's `llama3_json` parser reads): the
 * assistant's whole answer is one or more `{"name": <function>, "parameters": <arguments object>}` objects joined
 * by "; " ("arguments" is accepted for "parameters"). Llama may write the <|python_tag|> token first; it is a
 * special token, so it never reaches the text.
 *
 * Two ways to read it:
 * - forced (tool_choice `required` or a named function): a grammar made the output exactly that format, with the
 *   keys in that order, so calls stream as they are written: the id and name as soon as the name is complete,
 *   then each piece of the arguments.
 * - auto: the model may answer in text instead. The answer is text unless its first non-space character is `{`;
 *   such an answer is held back until it ends and becomes tool calls only if it parses completely as calls of
 *   known functions, and text otherwise. Text and tool calls are never mixed in one answer.
 *
 * @module
 */
import { randomBytes } from "node:crypto";

/** A piece of tool call `index`: the first carries `id` and `name`, the others more `arguments` text. */
export interface ToolCallPiece {
  index: number;
  id?: string;
  name?: string;
  arguments: string;
}

/** What one push produced: text for the user and/or tool-call pieces. */
export interface ParsedOutput {
  text: string;
  toolCalls: ToolCallPiece[];
}

export interface ToolCallParserOptions {
  mode: "forced" | "auto";
  /** Names of the functions the request offered (auto mode rejects calls of others). */
  functions: ReadonlySet<string>;
  /** false: only the first call is returned (OpenAI's parallel_tool_calls). */
  parallel: boolean;
}

/** OpenAI-style call ids. */
export const newToolCallId = (): string => `call_${randomBytes(12).toString("hex")}`;

/** Tracks where a JSON object or array ends, character by character. */
class JsonEnd {
  #depth = 0;
  #inString = false;
  #escaped = false;

  /** Feeds one character; true when it closed the outermost object or array. */
  feed(ch: string): boolean {
    if (this.#inString) {
      if (this.#escaped) this.#escaped = false;
      else if (ch === "\\") this.#escaped = true;
      else if (ch === '"') this.#inString = false;
      return false;
    }
    if (ch === '"') this.#inString = true;
    else if (ch === "{" || ch === "[") this.#depth++;
    else if (ch === "}" || ch === "]") return --this.#depth === 0;
    return false;
  }
}

/** `{"name": "<name>", "parameters": {` (or "arguments"), the header of a call up to its arguments' first brace. */
const CALL_HEADER = /^\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:parameters|arguments)"\s*:\s*\{$/;
/** A header longer than this is not one (the name is at most 64 characters). */
const MAX_HEADER = 256;

/**
 * Parses a complete answer as tool calls; null if it is anything else (then it is text).
 *
 * @example
 * parseToolCalls('{"name": "add", "parameters": {"a": 1}}', new Set(["add"])) // [{ name: "add", arguments: '{"a":1}' }]
 */
export function parseToolCalls(
  text: string,
  functions: ReadonlySet<string>,
): { name: string; arguments: string }[] | null {
  const calls: { name: string; arguments: string }[] = [];
  let i = 0;
  const skipSpace = () => {
    while (i < text.length && /\s/.test(text[i]!)) i++;
  };
  skipSpace();
  while (i < text.length) {
    if (text[i] !== "{") return null;
    const end = new JsonEnd();
    const start = i;
    while (i < text.length && !end.feed(text[i]!)) i++;
    if (i === text.length) return null; // unterminated
    i++;
    let value: unknown;
    try {
      value = JSON.parse(text.slice(start, i));
    } catch {
      return null;
    }
    const call = value as { name?: unknown; parameters?: unknown; arguments?: unknown };
    const args = call.parameters ?? call.arguments;
    if (typeof call.name !== "string" || !functions.has(call.name)) return null;
    if (typeof args !== "object" || args === null || Array.isArray(args)) return null;
    calls.push({ name: call.name, arguments: JSON.stringify(args) });
    skipSpace();
    if (text[i] === ";") {
      i++;
      skipSpace();
    }
  }
  return calls.length > 0 ? calls : null;
}

/** Reads calls as a grammar forces them, streaming each one's pieces as they arrive. */
class ForcedCalls {
  #state: "between" | "header" | "arguments" | "close" = "between";
  #header = "";
  #args: JsonEnd | null = null;
  #index = -1;
  #failed = false;

  /** Whether a call has started. */
  get started(): boolean {
    return this.#index >= 0;
  }

  push(text: string, out: ToolCallPiece[]): void {
    let piece: ToolCallPiece | null = null;
    for (const ch of text) {
      if (this.#failed) return;
      switch (this.#state) {
        case "between":
          if (ch === "{") {
            this.#state = "header";
            this.#header = ch;
          } else if (ch !== ";" && !/\s/.test(ch)) this.#fail();
          break;
        case "header": {
          this.#header += ch;
          const m = CALL_HEADER.exec(this.#header);
          if (m) {
            this.#index++;
            out.push({ index: this.#index, id: newToolCallId(), name: JSON.parse(m[1]!) as string, arguments: "" });
            this.#args = new JsonEnd();
            this.#args.feed("{");
            piece = { index: this.#index, arguments: "{" };
            out.push(piece);
            this.#state = "arguments";
          } else if (this.#header.length > MAX_HEADER) this.#fail();
          break;
        }
        case "arguments":
          if (!piece) {
            piece = { index: this.#index, arguments: "" };
            out.push(piece);
          }
          piece.arguments += ch;
          if (this.#args!.feed(ch)) this.#state = "close";
          break;
        case "close":
          if (ch === "}") {
            this.#state = "between";
            piece = null;
          } else if (!/\s/.test(ch)) this.#fail();
          break;
      }
    }
  }

  #fail(): void {
    // Cannot happen under the grammar; the text is dropped rather than passed off as arguments.
    this.#failed = true;
  }
}

/**
 * Splits a streamed answer into text and tool-call pieces. Feed it every text delta with `push`, then call `end`.
 */
export class ToolCallParser {
  readonly #o: ToolCallParserOptions;
  readonly #forced: ForcedCalls | null;
  /** auto: "undecided" until the first non-space character. */
  #route: "undecided" | "text" | "calls" = "undecided";
  #held = "";
  #sawCalls = false;

  constructor(o: ToolCallParserOptions) {
    this.#o = o;
    this.#forced = o.mode === "forced" ? new ForcedCalls() : null;
  }

  /** Whether the answer turned out to be tool calls (finish_reason `tool_calls`). */
  get calledTools(): boolean {
    return this.#sawCalls;
  }

  push(text: string): ParsedOutput {
    if (this.#forced) {
      const toolCalls: ToolCallPiece[] = [];
      this.#forced.push(text, toolCalls);
      return { text: "", toolCalls: this.#keep(toolCalls) };
    }
    if (this.#route === "text") return { text, toolCalls: [] };
    this.#held += text;
    if (this.#route === "undecided") {
      const first = this.#held.trimStart()[0];
      if (first === undefined) return { text: "", toolCalls: [] };
      this.#route = first === "{" ? "calls" : "text";
      if (this.#route === "text") return this.#release();
    }
    return { text: "", toolCalls: [] };
  }

  /** The rest, once the answer is complete (or cut by max_tokens: then held calls come out as text). */
  end(): ParsedOutput {
    if (this.#forced || this.#route !== "calls") return this.#release();
    const calls = parseToolCalls(this.#held, this.#o.functions);
    if (!calls) return this.#release();
    this.#held = "";
    const pieces = calls.flatMap((c, index) => [
      { index, id: newToolCallId(), name: c.name, arguments: "" },
      { index, arguments: c.arguments },
    ]);
    return { text: "", toolCalls: this.#keep(pieces) };
  }

  #release(): ParsedOutput {
    const text = this.#held;
    this.#held = "";
    return { text, toolCalls: [] };
  }

  /** Drops calls after the first when parallel calls are off. */
  #keep(pieces: ToolCallPiece[]): ToolCallPiece[] {
    const kept = this.#o.parallel ? pieces : pieces.filter((p) => p.index === 0);
    if (kept.length > 0) this.#sawCalls = true;
    return kept;
  }
}
