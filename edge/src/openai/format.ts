/**
 * Response objects and stream chunks exactly as OpenAI sends them, for chat completions and (legacy) completions,
 * typed with the `openai` package's own types so the wire shapes are checked at compile time. A formatter turns a
 * job's events into either one response object (non-streaming) or a sequence of chunks.
 *
 * @module
 */
import type { Logprob, Usage } from "@llama-edge/shared";
import type {
  ChatCompletion,
  ChatCompletionChunk,
  ChatCompletionTokenLogprob,
} from "openai/resources/chat/completions";
import type { Completion, CompletionChoice, CompletionUsage } from "openai/resources/completions";
import type { JobEvent } from "../dispatch/job.ts";
import { randomBase62 } from "../keys/api-key.ts";

export type FinishReason = "stop" | "length";
type DeltaEvent = Extract<JobEvent, { type: "delta" }>;
type FinalEvent = Extract<JobEvent, { type: "final" }>;

/**
 * A streamed completions chunk. OpenAI streams `Completion` objects whose choices have `finish_reason: null` until
 * their last chunk, and with stream_options.include_usage `usage: null` on every chunk but the last: nulls the
 * package's `Completion` type does not admit.
 */
export type CompletionChunkChoice = Omit<CompletionChoice, "finish_reason"> & {
  finish_reason: CompletionChoice["finish_reason"] | null;
};
export type CompletionChunk = Omit<Completion, "usage" | "choices"> & {
  choices: CompletionChunkChoice[];
  usage?: CompletionUsage | null;
};

/** "abort" only happens once the client is gone, so no client ever sees it; "stop" if one ever does. */
const finishReason = (r: FinalEvent["finish_reason"]): FinishReason => (r === "length" ? "length" : "stop");

export const newCompletionId = (kind: "chat" | "completion"): string =>
  `${kind === "chat" ? "chatcmpl" : "cmpl"}-${randomBase62(24)}`;

export function openAIUsage(u: Usage): CompletionUsage {
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
export interface ResponseFormatter<Chunk extends object = object, Full extends object = object> {
  /** Chunks sent before any token: the assistant role of every chat choice, the echoed prompt of completions. */
  openingChunks(): Chunk[];
  /** The chunk for a delta, or null when it carries nothing to show. Also accumulates for `response()`. */
  deltaChunk(ev: DeltaEvent): Chunk | null;
  /** The chunk closing a choice (empty delta or text, with finish_reason). */
  finalChunk(ev: FinalEvent): Chunk;
  /** With stream_options.include_usage: the last chunk, with empty choices. */
  usageChunk(usage: Usage): Chunk;
  /** The non-streaming response, from everything accumulated. */
  response(usage: Usage): Full;
}

interface ChoiceText {
  text: string;
  logprobs: Logprob[];
  finish: FinishReason | null;
}

export interface FormatterOptions {
  id: string;
  model: string;
  created: number;
  numChoices: number;
  /** Requested logprobs (chat: logprobs=true; completions: logprobs=k). */
  logprobs: boolean;
  /** stream_options.include_usage: every chunk then carries `usage: null` until the usage chunk. */
  includeUsage: boolean;
}

/** A streamed chunk: the envelope fields, its choices, and `usage`. */
interface ChunkShape<Choice> {
  id: string;
  object: string;
  created: number;
  model: string;
  choices: Choice[];
  usage?: CompletionUsage | null;
}

abstract class BaseFormatter<Chunk extends ChunkShape<ChunkChoice>, ChunkChoice, Full extends object>
  implements ResponseFormatter<Chunk, Full>
{
  protected readonly choices: ChoiceText[];
  constructor(protected readonly o: FormatterOptions) {
    this.choices = Array.from({ length: o.numChoices }, () => ({ text: "", logprobs: [], finish: null }));
  }

  protected choice(index: number): ChoiceText {
    return this.choices[index]!;
  }

  /** `object` of this API's streamed chunks. */
  protected abstract readonly chunkObject: Chunk["object"];

  /** A streamed chunk around `choices`. */
  protected chunk(choices: ChunkChoice[]): Chunk {
    const { id, created, model, includeUsage } = this.o;
    return { id, object: this.chunkObject, created, model, choices, ...(includeUsage ? { usage: null } : {}) } as Chunk;
  }

  usageChunk(usage: Usage): Chunk {
    return { ...this.chunk([]), usage: openAIUsage(usage) };
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

  abstract openingChunks(): Chunk[];
  abstract deltaChunk(ev: DeltaEvent): Chunk | null;
  abstract finalChunk(ev: FinalEvent): Chunk;
  abstract response(usage: Usage): Full;
}

// ---------------------------------------------------------------------------------------------------------------
// Chat completions

function chatLogprob(l: Logprob): ChatCompletionTokenLogprob {
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

export class ChatFormatter extends BaseFormatter<ChatCompletionChunk, ChatCompletionChunk.Choice, ChatCompletion> {
  protected readonly chunkObject = "chat.completion.chunk";

  openingChunks(): ChatCompletionChunk[] {
    return this.choices.map((_, index) =>
      this.chunk([
        { index, delta: { role: "assistant", content: "", refusal: null }, logprobs: null, finish_reason: null },
      ]),
    );
  }

  deltaChunk(ev: DeltaEvent): ChatCompletionChunk | null {
    const shown = this.accumulate(ev);
    if (!shown) return null;
    const lps = shown.logprobs;
    return this.chunk([
      {
        index: ev.index,
        delta: { content: ev.text },
        logprobs: lps ? { content: lps.map(chatLogprob), refusal: null } : null,
        finish_reason: null,
      },
    ]);
  }

  finalChunk(ev: FinalEvent): ChatCompletionChunk {
    return this.chunk([{ index: ev.index, delta: {}, logprobs: null, finish_reason: this.finish(ev) }]);
  }

  response(usage: Usage): ChatCompletion {
    const { id, created, model } = this.o;
    return {
      id,
      object: "chat.completion",
      created,
      model,
      choices: this.choices.map((c, index) => ({
        index,
        message: { role: "assistant", content: c.text, refusal: null },
        logprobs: this.o.logprobs ? { content: c.logprobs.map(chatLogprob), refusal: null } : null,
        finish_reason: c.finish ?? "stop",
      })),
      usage: openAIUsage(usage),
    };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Completions

export class CompletionFormatter extends BaseFormatter<CompletionChunk, CompletionChunkChoice, Completion> {
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

  #logprobs(index: number, lps: Logprob[]): CompletionChoice.Logprobs {
    const out = {
      tokens: [] as string[],
      token_logprobs: [] as number[],
      top_logprobs: [] as Record<string, number>[],
      text_offset: [] as number[],
    };
    for (const l of lps) {
      out.tokens.push(l.token);
      out.token_logprobs.push(l.logprob);
      out.top_logprobs.push(Object.fromEntries((l.top_logprobs ?? []).map((t) => [t.token, t.logprob])));
      out.text_offset.push(this.#offsets[index]!);
      this.#offsets[index]! += l.token.length;
    }
    return out;
  }

  openingChunks(): CompletionChunk[] {
    return this.#echo.flatMap((text, index) =>
      text ? [this.chunk([{ text, index, logprobs: null, finish_reason: null }])] : [],
    );
  }

  deltaChunk(ev: DeltaEvent): CompletionChunk | null {
    const shown = this.accumulate(ev);
    if (!shown) return null;
    const lps = shown.logprobs;
    return this.chunk([
      {
        text: ev.text,
        index: ev.index,
        logprobs: lps ? this.#logprobs(ev.index, lps) : null,
        finish_reason: null,
      },
    ]);
  }

  finalChunk(ev: FinalEvent): CompletionChunk {
    return this.chunk([{ text: "", index: ev.index, logprobs: null, finish_reason: this.finish(ev) }]);
  }

  response(usage: Usage): Completion {
    const { id, created, model } = this.o;
    // Offsets restart for the whole-response logprobs (streaming already consumed them per chunk).
    this.#echo.forEach((e, i) => {
      this.#offsets[i] = e?.length ?? 0;
    });
    return {
      id,
      object: "text_completion",
      created,
      model,
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
