/**
 * Response objects and stream chunks exactly as OpenAI sends them, for chat completions and (legacy) completions.
 * A formatter turns a job's events into either one response object (non-streaming) or a sequence of chunks.
 *
 * @module
 */
import type { Logprob, ToolCallDelta, Usage } from "@llama-edge/shared";
import type { JobEvent } from "../dispatch/job.ts";
import { randomBase62 } from "../keys/api-key.ts";

export type FinishReason = "stop" | "length" | "tool_calls";
type DeltaEvent = Extract<JobEvent, { type: "delta" }>;
type FinalEvent = Extract<JobEvent, { type: "final" }>;

/** "abort" only happens once the client is gone, so no client ever sees it; "stop" if one ever does. */
const finishReason = (r: FinalEvent["finish_reason"]): FinishReason => (r === "abort" ? "stop" : r);

export const newCompletionId = (kind: "chat" | "completion"): string =>
  `${kind === "chat" ? "chatcmpl" : "cmpl"}-${randomBase62(24)}`;

export interface OpenAIUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details: { cached_tokens: number };
  completion_tokens_details: { reasoning_tokens: number };
}

export function openAIUsage(u: Usage): OpenAIUsage {
  return {
    prompt_tokens: u.prompt_tokens,
    completion_tokens: u.completion_tokens,
    total_tokens: u.prompt_tokens + u.completion_tokens,
    prompt_tokens_details: { cached_tokens: u.cached_tokens },
    completion_tokens_details: { reasoning_tokens: 0 },
  };
}

const utf8Bytes = (s: string): number[] => Array.from(new TextEncoder().encode(s));

/** Turns events into OpenAI objects. One instance per request. */
export interface ResponseFormatter {
  /** Chunks sent before any token: the assistant role of every chat choice, the echoed prompt of completions. */
  openingChunks(): object[];
  /** The chunk for a delta, or null when it carries nothing to show. Also accumulates for `response()`. */
  deltaChunk(ev: DeltaEvent): object | null;
  /** The chunk closing a choice (empty delta or text, with finish_reason). */
  finalChunk(ev: FinalEvent): object;
  /** With stream_options.include_usage: the last chunk, with empty choices. */
  usageChunk(usage: Usage): object;
  /** The non-streaming response, from everything accumulated. */
  response(usage: Usage): object;
}

interface ChoiceText {
  text: string;
  logprobs: Logprob[];
  finish: FinishReason | null;
  /** Tool calls, assembled from their pieces (chat only). */
  toolCalls: { id: string; name: string; arguments: string }[];
}

interface FormatterOptions {
  id: string;
  model: string;
  created: number;
  numChoices: number;
  /** Requested logprobs (chat: logprobs=true; completions: logprobs=k). */
  logprobs: boolean;
  /** stream_options.include_usage: every chunk then carries `usage: null` until the usage chunk. */
  includeUsage: boolean;
}

abstract class BaseFormatter implements ResponseFormatter {
  protected readonly choices: ChoiceText[];
  constructor(protected readonly o: FormatterOptions) {
    this.choices = Array.from({ length: o.numChoices }, () => ({
      text: "",
      logprobs: [],
      finish: null,
      toolCalls: [],
    }));
  }

  protected choice(index: number): ChoiceText {
    return this.choices[index]!;
  }

  /** `object` of this API's streamed chunks. */
  protected abstract readonly chunkObject: string;

  /** A streamed chunk around `choices`. */
  protected chunk(choices: object[]): object {
    const { id, created, model, includeUsage } = this.o;
    return {
      id,
      object: this.chunkObject,
      created,
      model,
      system_fingerprint: null,
      choices,
      ...(includeUsage ? { usage: null } : {}),
    };
  }

  /**
   * Adds a delta to its choice for `response()`. Returns the logprobs to show with it (undefined when not
   * requested), or null when the delta shows nothing at all.
   */
  protected accumulate(ev: DeltaEvent): { logprobs: Logprob[] | undefined } | null {
    const c = this.choice(ev.index);
    c.text += ev.text;
    const logprobs = this.o.logprobs && ev.logprobs ? ev.logprobs : undefined;
    if (logprobs) c.logprobs.push(...logprobs);
    return ev.text === "" && !logprobs ? null : { logprobs };
  }

  /** Records how a choice ended; returns the finish_reason to send. */
  protected finish(ev: FinalEvent): FinishReason {
    const finish = finishReason(ev.finish_reason);
    this.choice(ev.index).finish = finish;
    return finish;
  }

  abstract openingChunks(): object[];
  abstract deltaChunk(ev: DeltaEvent): object | null;
  abstract finalChunk(ev: FinalEvent): object;
  abstract usageChunk(usage: Usage): object;
  abstract response(usage: Usage): object;
}

// ---------------------------------------------------------------------------------------------------------------
// Chat completions

function chatLogprob(l: Logprob) {
  return {
    token: l.token,
    logprob: l.logprob,
    bytes: l.bytes ?? utf8Bytes(l.token),
    top_logprobs: (l.top_logprobs ?? []).map((t) => ({
      token: t.token,
      logprob: t.logprob,
      bytes: t.bytes ?? utf8Bytes(t.token),
    })),
  };
}

/** A tool-call piece as OpenAI streams it: id, type and name in the first piece of a call, then arguments. */
function toolCallChunk(p: ToolCallDelta) {
  return p.id !== undefined
    ? { index: p.index, id: p.id, type: "function", function: { name: p.name, arguments: p.arguments } }
    : { index: p.index, function: { arguments: p.arguments } };
}

export class ChatFormatter extends BaseFormatter {
  protected readonly chunkObject = "chat.completion.chunk";

  /** Adds tool-call pieces to their choice's calls; returns them as chunk parts (undefined if none). */
  #toolCalls(ev: DeltaEvent): object[] | undefined {
    if (!ev.tool_calls?.length) return undefined;
    const calls = this.choice(ev.index).toolCalls;
    for (const p of ev.tool_calls) {
      if (p.id !== undefined) calls[p.index] = { id: p.id, name: p.name ?? "", arguments: "" };
      const call = calls[p.index];
      if (call) call.arguments += p.arguments;
    }
    return ev.tool_calls.map(toolCallChunk);
  }

  openingChunks(): object[] {
    return this.choices.map((_, index) =>
      this.chunk([
        { index, delta: { role: "assistant", content: "", refusal: null }, logprobs: null, finish_reason: null },
      ]),
    );
  }

  deltaChunk(ev: DeltaEvent): object | null {
    const shown = this.accumulate(ev);
    const toolCalls = this.#toolCalls(ev);
    if (!shown && !toolCalls) return null;
    const lps = shown?.logprobs;
    const delta = toolCalls
      ? { ...(ev.text ? { content: ev.text } : {}), tool_calls: toolCalls }
      : { content: ev.text };
    return this.chunk([
      {
        index: ev.index,
        delta,
        logprobs: lps ? { content: lps.map(chatLogprob), refusal: null } : null,
        finish_reason: null,
      },
    ]);
  }

  finalChunk(ev: FinalEvent): object {
    return this.chunk([{ index: ev.index, delta: {}, logprobs: null, finish_reason: this.finish(ev) }]);
  }

  usageChunk(usage: Usage): object {
    const { id, created, model } = this.o;
    return {
      id,
      object: "chat.completion.chunk",
      created,
      model,
      system_fingerprint: null,
      choices: [],
      usage: openAIUsage(usage),
    };
  }

  response(usage: Usage): object {
    const { id, created, model } = this.o;
    return {
      id,
      object: "chat.completion",
      created,
      model,
      choices: this.choices.map((c, index) => ({
        index,
        message: {
          role: "assistant",
          // OpenAI: content is null when the turn is only tool calls
          content: c.text === "" && c.toolCalls.length > 0 ? null : c.text,
          refusal: null,
          ...(c.toolCalls.length > 0
            ? {
                tool_calls: c.toolCalls.map((t) => ({
                  id: t.id,
                  type: "function",
                  function: { name: t.name, arguments: t.arguments },
                })),
              }
            : {}),
        },
        logprobs: this.o.logprobs ? { content: c.logprobs.map(chatLogprob), refusal: null } : null,
        finish_reason: c.finish ?? "stop",
      })),
      usage: openAIUsage(usage),
      system_fingerprint: null,
    };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Completions

interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: number[];
  top_logprobs: Record<string, number>[];
  text_offset: number[];
}

export class CompletionFormatter extends BaseFormatter {
  readonly #echo: (string | null)[];
  /** Characters of each choice's text so far, for text_offset. */
  readonly #offsets: number[];

  /** @param echo per choice, the prompt text to repeat before the completion (null: no echo) */
  constructor(o: FormatterOptions, echo: (string | null)[]) {
    super(o);
    this.#echo = echo;
    this.#offsets = this.choices.map((_, i) => echo[i]?.length ?? 0);
    this.choices.forEach((c, i) => {
      c.text = echo[i] ?? "";
    });
  }

  protected readonly chunkObject = "text_completion";

  #logprobs(index: number, lps: Logprob[]): CompletionLogprobs {
    const out: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
    for (const l of lps) {
      out.tokens.push(l.token);
      out.token_logprobs.push(l.logprob);
      out.top_logprobs.push(Object.fromEntries((l.top_logprobs ?? []).map((t) => [t.token, t.logprob])));
      out.text_offset.push(this.#offsets[index]!);
      this.#offsets[index]! += l.token.length;
    }
    return out;
  }

  openingChunks(): object[] {
    return this.#echo.flatMap((text, index) =>
      text ? [this.chunk([{ text, index, logprobs: null, finish_reason: null }])] : [],
    );
  }

  deltaChunk(ev: DeltaEvent): object | null {
    const shown = this.accumulate(ev);
    if (!shown) return null;
    const lps = shown.logprobs;
    return this.chunk([
      { text: ev.text, index: ev.index, logprobs: lps ? this.#logprobs(ev.index, lps) : null, finish_reason: null },
    ]);
  }

  finalChunk(ev: FinalEvent): object {
    return this.chunk([{ text: "", index: ev.index, logprobs: null, finish_reason: this.finish(ev) }]);
  }

  usageChunk(usage: Usage): object {
    const { id, created, model } = this.o;
    return { id, object: "text_completion", created, model, choices: [], usage: openAIUsage(usage) };
  }

  response(usage: Usage): object {
    const { id, created, model } = this.o;
    // Offsets restart for the whole-response logprobs (streaming already consumed them per chunk).
    this.#offsets.fill(0);
    this.#echo.forEach((e, i) => {
      this.#offsets[i] = e?.length ?? 0;
    });
    return {
      id,
      object: "text_completion",
      created,
      model,
      system_fingerprint: null,
      choices: this.choices.map((c, index) => ({
        text: c.text,
        index,
        logprobs: this.o.logprobs ? this.#logprobs(index, c.logprobs) : null,
        finish_reason: c.finish ?? "stop",
      })),
      usage: openAIUsage(usage),
    };
  }
}

export type { FormatterOptions };
