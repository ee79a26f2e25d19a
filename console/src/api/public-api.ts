/**
 * The public API with an API key: models, the key's own usage, and streamed chat completions. This client never
 * sees the admin secret (admin-api.ts has it), and the key travels only in the Authorization header.
 *
 * @module
 */
import { EventSourceParserStream } from "eventsource-parser/stream";
import { ApiError, errorFromBody, errorFromResponse } from "./api-error.ts";
import { type OwnUsageReport, type RateState, rateStateFrom } from "./types.ts";

/** The chat request the playground builds (OpenAI's fields; unset ones are left out). */
export interface ChatRequest {
  model: string;
  messages: { role: "system" | "user" | "assistant"; content: string }[];
  temperature?: number;
  top_p?: number;
  max_tokens?: number;
  stop?: string[];
  seed?: number;
}

export interface StreamResult {
  finishReason: string | null;
  /** From the final usage chunk; null when the stream was stopped before it. */
  usage: { prompt_tokens: number; completion_tokens: number } | null;
  /** Content chunks received (about one token each). */
  chunks: number;
}

interface ChatChunk {
  choices?: { delta?: { content?: string | null }; finish_reason?: string | null }[];
  usage?: { prompt_tokens: number; completion_tokens: number } | null;
  error?: { message?: string; code?: string };
}

export class PublicApi {
  constructor(private readonly apiKey: string) {}

  private async call(path: string, init: RequestInit = {}): Promise<Response> {
    const res = await fetch(`/v1${path}`, {
      ...init,
      headers: { authorization: `Bearer ${this.apiKey}`, "content-type": "application/json" },
      // The key is a credential of its own: no cookies, no cache.
      credentials: "omit",
      cache: "no-store",
    });
    if (!res.ok) throw await errorFromResponse(res);
    return res;
  }

  async models(): Promise<string[]> {
    const res = await this.call("/models");
    const body = (await res.json()) as { data: { id: string }[] };
    return body.data.map((m) => m.id);
  }

  /** The key's usage report and what its rate limits leave now. */
  async usage(range: { start: string; end: string }): Promise<{ report: OwnUsageReport; rate: RateState }> {
    const res = await this.call(`/usage?start_date=${range.start}&end_date=${range.end}`);
    return { report: (await res.json()) as OwnUsageReport, rate: rateStateFrom(res.headers) };
  }

  /**
   * Streams a chat completion, calling `onText` with each piece of content as it arrives. Aborting `signal` (the
   * Stop button) closes the connection: the gateway cancels the request at the worker.
   */
  async streamChat(
    request: ChatRequest,
    opts: { signal: AbortSignal; onText: (text: string) => void },
  ): Promise<StreamResult> {
    const res = await this.call("/chat/completions", {
      method: "POST",
      body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
      signal: opts.signal,
    });
    const result: StreamResult = { finishReason: null, usage: null, chunks: 0 };
    const events = res
      .body!.pipeThrough(new TextDecoderStream())
      .pipeThrough(new EventSourceParserStream())
      .getReader();
    for (;;) {
      const { value, done } = await events.read();
      if (done || value.data === "[DONE]") break;
      const chunk = JSON.parse(value.data) as ChatChunk;
      // A failure after the first token arrives as a final error event (the HTTP status was already 200).
      if (chunk.error) throw errorFromBody(chunk, res.status);
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) {
        result.chunks += 1;
        opts.onText(choice.delta.content);
      }
      if (choice?.finish_reason) result.finishReason = choice.finish_reason;
      if (chunk.usage) result.usage = chunk.usage;
    }
    if (result.finishReason === null && result.usage === null) {
      throw new ApiError("The stream ended before the reply was complete.", res.status);
    }
    return result;
  }
}
