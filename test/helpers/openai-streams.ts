/**
 * Streams through the official `openai` client, watched from the outside: which worker serves it, when its first
 * token arrives, and how it ends (finish_reason and usage, or the error event that ended it, and when).
 *
 * @module
 */
import OpenAI from "openai";

export interface StreamOutcome {
  /** The completion's id (`chatcmpl-…`); the worker's request id starts with it. */
  id?: string;
  text: string;
  finishReason?: string | null;
  usage?: OpenAI.CompletionUsage;
  /** The stream's error event (or the HTTP error before it started). */
  error?: { status?: number; type?: string; code?: string | null; message: string };
  /** Date.now() when the stream ended, either way. */
  endedAt: number;
}

export interface WatchedStream {
  /** The completion's id (`chatcmpl-…`): set by the first chunk. */
  id: string | null;
  /** `x-request-id`, the job's name: the workers' request ids start with it. */
  requestId: string | null;
  /** `x-llama-edge-worker` (the gateway must run with expose_worker_id). */
  worker: string | null;
  /** Resolves at the first content token. */
  firstToken: Promise<void>;
  outcome: Promise<StreamOutcome>;
  abort(): void;
}

export const client = (baseUrl: string, apiKey: string) =>
  new OpenAI({ apiKey, baseURL: `${baseUrl}/v1`, maxRetries: 0, timeout: 120_000 });

function toError(e: unknown): NonNullable<StreamOutcome["error"]> {
  if (e instanceof OpenAI.APIError) {
    return { status: e.status, type: e.type, code: e.code, message: e.message };
  }
  return { message: e instanceof Error ? e.message : String(e) };
}

/** Starts a chat stream with usage; resolves once the response has started (headers are in). */
export async function watchStream(
  openai: OpenAI,
  params: Omit<OpenAI.ChatCompletionCreateParamsStreaming, "stream"> & Record<string, unknown>,
): Promise<WatchedStream> {
  const controller = new AbortController();
  const { data: stream, response } = await openai.chat.completions
    .create(
      {
        ...params,
        stream: true,
        stream_options: { include_usage: true },
      } as OpenAI.ChatCompletionCreateParamsStreaming,
      { signal: controller.signal },
    )
    .withResponse();
  let onFirst = () => {};
  const firstToken = new Promise<void>((resolve) => {
    onFirst = resolve;
  });
  const watched: WatchedStream = {
    id: null,
    requestId: response.headers.get("x-request-id"),
    worker: response.headers.get("x-llama-edge-worker"),
    firstToken,
    outcome: Promise.resolve({ text: "", endedAt: 0 }),
    abort: () => controller.abort(),
  };
  watched.outcome = (async (): Promise<StreamOutcome> => {
    const out: StreamOutcome = { text: "", endedAt: 0 };
    try {
      for await (const chunk of stream) {
        out.id = chunk.id;
        watched.id = chunk.id;
        const choice = chunk.choices[0];
        if (choice?.delta?.content) {
          out.text += choice.delta.content;
          onFirst();
        }
        if (choice?.finish_reason) out.finishReason = choice.finish_reason;
        if (chunk.usage) out.usage = chunk.usage;
      }
    } catch (e) {
      out.error = toError(e);
    }
    out.endedAt = Date.now();
    onFirst();
    return out;
  })();
  return watched;
}

/** A short non-streaming chat: the outcome, never a throw. */
export async function chatOnce(
  openai: OpenAI,
  params: Omit<OpenAI.ChatCompletionCreateParamsNonStreaming, "messages"> & {
    messages?: OpenAI.ChatCompletionMessageParam[];
  },
): Promise<StreamOutcome & { worker: string | null; requestId: string | null }> {
  try {
    const { data, response } = await openai.chat.completions
      .create({ messages: [{ role: "user", content: "Hi" }], ...params })
      .withResponse();
    return {
      id: data.id,
      text: data.choices[0]?.message.content ?? "",
      finishReason: data.choices[0]?.finish_reason,
      usage: data.usage,
      endedAt: Date.now(),
      worker: response.headers.get("x-llama-edge-worker"),
      // the job's name: the workers' request ids start with it
      requestId: response.headers.get("x-request-id"),
    };
  } catch (e) {
    return { text: "", error: toError(e), endedAt: Date.now(), worker: null, requestId: null };
  }
}
