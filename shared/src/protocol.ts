/**
 * The dispatch protocol between the gateway and the GPU workers: NATS names per pool, the request message, the
 * token events streamed back, cancels, the redelivery claim, and load reports. Every message is JSON, carries the
 * protocol version `v`, and is validated with zod at the receiving end: a malformed message yields a
 * `ParseFailure` (with the request id and reply subject when they could be recovered), never an exception.
 *
 * Flow of one request:
 *
 *   gateway                         NATS                                   worker
 *   subscribe(reply_to)
 *   publish RequestMessage ──▶ stream llama-pool-<pool> (work queue)
 *                                  consumer llama-workers-<pool> ◀── pull 1 (only when the engine has room)
 *                              (redelivered message only) ◀── ClaimMessage, answered by ClaimReply
 *   ◀── start, heartbeat*, delta*, final | error  (reply_to, seq 0, 1, 2, …)
 *   publish CancelMessage ──▶ llama.pool.<pool>.cancel ──▶ every worker of the pool; the one running it aborts
 *
 * Unknown fields are ignored (additions within a version stay compatible); a change that old peers would
 * misread bumps `PROTOCOL_VERSION`, and a peer rejects versions it does not speak with `unsupported_version`.
 *
 * @module
 */
import { z } from "zod";

export const PROTOCOL_VERSION = 1;

/** Largest request message a worker accepts. NATS' default max_payload is 1 MiB; we stay below it so that an
 *  oversized request still reaches a worker and is answered with `too_large` instead of vanishing. */
export const MAX_REQUEST_BYTES = 512 * 1024;

/** A worker sends a heartbeat for a request after this long without any other event for it. */
export const HEARTBEAT_INTERVAL_MS = 1000;
/** The dispatcher gives up on a started request after this long without an event: two and a half missed
 *  heartbeats, so a dead worker is reported within 3 s of its last event. */
export const DEFAULT_HEARTBEAT_TIMEOUT_MS = 2500;
/** How often a worker publishes its load report. */
export const LOAD_REPORT_INTERVAL_MS = 2000;

// ---------------------------------------------------------------------------------------------------------------
// Names per pool

const POOL_NAME = /^[a-z0-9-]{1,64}$/;

export const isValidPoolName = (pool: string): boolean => POOL_NAME.test(pool);

/** Every NATS name of one worker pool. The infra manifests (KEDA's nats-jetstream scaler) use the same names. */
export interface PoolNames {
  /** JetStream stream (work-queue retention) holding the pool's submitted requests. */
  stream: string;
  /** Durable pull consumer every worker of the pool pulls from; its lag is the autoscaling signal. */
  consumer: string;
  /** Subject the stream captures: requests are published here. */
  requests: string;
  /** Load reports of the pool's workers. */
  load: string;
  /** Cancels for the pool's requests; every worker of the pool listens and the one running the id aborts it. */
  cancel: string;
  /**
   * Addressed requests (prefix affinity): each worker listens on `directSubject(pool, token)`, which this pattern
   * matches, and advertises it in its load reports. The gateway offers a request there as a NATS request; the
   * worker answers `DirectReply` at once and, if it accepted, runs the request exactly as a pulled one.
   */
  direct: string;
}

/**
 * @example
 * poolNames("default").stream // "llama-pool-default"
 * @throws TypeError when `pool` is not `[a-z0-9-]{1,64}`
 */
export function poolNames(pool: string): PoolNames {
  if (!isValidPoolName(pool)) throw new TypeError(`invalid pool name ${JSON.stringify(pool)}: expected [a-z0-9-]+`);
  return {
    stream: `llama-pool-${pool}`,
    consumer: `llama-workers-${pool}`,
    requests: `llama.pool.${pool}.requests`,
    load: `llama.pool.${pool}.load`,
    cancel: `llama.pool.${pool}.cancel`,
    direct: `llama.pool.${pool}.worker.*`,
  };
}

/** The subject on which one worker takes addressed requests; `token` is [a-z0-9]+, unique per worker process. */
export function directSubject(pool: string, token: string): string {
  if (!/^[a-z0-9]+$/.test(token))
    throw new TypeError(`invalid worker token ${JSON.stringify(token)}: expected [a-z0-9]+`);
  return poolNames(pool).direct.replace("*", token);
}

// ---------------------------------------------------------------------------------------------------------------
// Error codes carried by `error` events

export const ERROR_CODES = [
  /** The message or its parameters are invalid (schema, sampling ranges). */
  "bad_request",
  /** The prompt leaves no room to generate in the model's context (or does not fit the worker's KV cache). */
  "context_length_exceeded",
  "unsupported_version",
  /** The request message is larger than MAX_REQUEST_BYTES. */
  "too_large",
  /** The pool does not serve the requested model. */
  "model_not_found",
  /** The deadline passed before a worker could start the request. */
  "deadline_exceeded",
  /** The worker cannot run it (shutting down past its grace period, engine failure); retrying elsewhere may work. */
  "unavailable",
  /** A redelivered request whose first worker had already started it (the worker died mid-stream). */
  "worker_lost",
  "internal",
] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];

// ---------------------------------------------------------------------------------------------------------------
// Request

/** Printable ASCII without spaces; ids show up in logs and metrics labels. */
const requestId = z
  .string()
  .min(1)
  .max(128)
  .regex(/^[\x21-\x7e]+$/, "printable ASCII without spaces");

/** A concrete NATS subject: dot-separated tokens, no wildcards, no whitespace. */
const subject = z
  .string()
  .max(256)
  .regex(/^[^.\s*>]+(\.[^.\s*>]+)*$/, "a NATS subject without wildcards");

const tokenId = z.number().int().min(0);

/** Sampling parameters with OpenAI/vLLM names. All optional: the engine applies its defaults and checks the
 *  combinations (a rejected combination comes back as a `bad_request` error event). */
export const SamplingParamsSchema = z.object({
  temperature: z.number().min(0).optional(),
  top_p: z.number().gt(0).max(1).optional(),
  top_k: z.number().int().min(-1).optional(),
  min_p: z.number().min(0).max(1).optional(),
  repetition_penalty: z.number().gt(0).optional(),
  presence_penalty: z.number().min(-2).max(2).optional(),
  frequency_penalty: z.number().min(-2).max(2).optional(),
  /** Token id (as a JSON key) -> bias added to its logit. */
  logit_bias: z.record(z.string().regex(/^\d+$/), z.number().min(-100).max(100)).optional(),
  seed: z.number().int().nullable().optional(),
  max_tokens: z.number().int().min(1).nullable().optional(),
  stop: z.array(z.string().min(1)).max(16).optional(),
  stop_token_ids: z.array(tokenId).max(64).optional(),
  ignore_eos: z.boolean().optional(),
  logprobs: z.boolean().optional(),
  top_logprobs: z.number().int().min(0).max(20).optional(),
});
export type SamplingParams = z.infer<typeof SamplingParamsSchema>;

// ---------------------------------------------------------------------------------------------------------------
// Chat messages, tools and structured output (OpenAI's shapes)

/** A JSON Schema as the client wrote it; the worker's grammar engine decides what it can enforce. */
const jsonSchema = z.union([z.record(z.string(), z.unknown()), z.boolean()]);

/** A function call the assistant made, as OpenAI writes it (arguments: JSON text). */
export const ToolCallSchema = z.object({
  id: z.string().min(1).max(256),
  type: z.literal("function"),
  function: z.object({ name: z.string().min(1), arguments: z.string() }),
});
export type ToolCall = z.infer<typeof ToolCallSchema>;

export const ChatMessageSchema = z.object({
  role: z.enum(["system", "user", "assistant", "tool"]),
  /** null only for an assistant message that made tool calls. */
  content: z.string().nullable(),
  /** Assistant messages: the calls it made. */
  tool_calls: z.array(ToolCallSchema).min(1).optional(),
  /** Tool messages: the call this is the result of. */
  tool_call_id: z.string().min(1).optional(),
});
export type ChatMessage = z.infer<typeof ChatMessageSchema>;

/** A function the model may call (OpenAI's `tools` entries; rendered by the model's chat template). */
export const ToolSchema = z.object({
  type: z.literal("function"),
  function: z.object({
    name: z.string().regex(/^[a-zA-Z0-9_-]{1,64}$/, "1 to 64 letters, digits, _ or -"),
    description: z.string().optional(),
    /** JSON Schema of the arguments; absent: no arguments. */
    parameters: jsonSchema.optional(),
    strict: z.boolean().nullish(),
  }),
});
export type Tool = z.infer<typeof ToolSchema>;

/** none: never call; auto: the model decides; required: at least one call; or that named function. */
export const ToolChoiceSchema = z.union([
  z.enum(["none", "auto", "required"]),
  z.object({ type: z.literal("function"), function: z.object({ name: z.string().min(1) }) }),
]);
export type ToolChoice = z.infer<typeof ToolChoiceSchema>;

/** OpenAI's response_format: the output is constrained token by token on the worker (json_object, json_schema). */
export const ResponseFormatSchema = z.discriminatedUnion("type", [
  z.object({ type: z.literal("text") }),
  z.object({ type: z.literal("json_object") }),
  z.object({
    type: z.literal("json_schema"),
    json_schema: z.object({
      name: z.string().min(1).max(64),
      description: z.string().optional(),
      /** Absent: any JSON value is fine, as OpenAI treats it. */
      schema: jsonSchema.optional(),
      strict: z.boolean().nullish(),
    }),
  }),
]);
export type ResponseFormat = z.infer<typeof ResponseFormatSchema>;

/**
 * The prompt: text (a completion prompt, used as is), token ids (used as they are), or chat messages.
 *
 * NOTE: the chat template is rendered in one place, the worker, never in the gateway. The template belongs to the
 * model (tokenizer_config.json next to the weights, with its bos/eos strings), and only the worker has the model
 * directory and the tokenizer. vLLM renders in its API server for the same reason: that is where its tokenizer
 * lives. Rendering in the gateway would mean shipping every pool's template to the edge and keeping them in step
 * with the deployed weights; here the gateway stays model-agnostic and a pool can change models alone.
 */
export const PromptSchema = z.discriminatedUnion("type", [
  z.object({ type: z.literal("text"), text: z.string() }),
  z.object({ type: z.literal("tokens"), token_ids: z.array(tokenId).min(1) }),
  z.object({
    type: z.literal("chat"),
    messages: z.array(ChatMessageSchema).min(1),
    add_generation_prompt: z.boolean().default(true),
    /** Functions the model may call: the chat template renders them into the prompt. */
    tools: z.array(ToolSchema).min(1).optional(),
  }),
]);
export type Prompt = z.infer<typeof PromptSchema>;

export const RequestMessageSchema = z.object({
  v: z.literal(PROTOCOL_VERSION),
  id: requestId,
  /** The model name the pool serves (a worker rejects others with `model_not_found`). */
  model: z.string().min(1).max(256),
  prompt: PromptSchema,
  sampling: SamplingParamsSchema.default({}),
  /** Constrains the output (absent: text). */
  response_format: ResponseFormatSchema.optional(),
  /** Chat prompts with tools only (absent: auto). The worker parses tool calls out of the output, see `delta`. */
  tool_choice: ToolChoiceSchema.optional(),
  /** With tools: whether the model may make several calls in one turn (absent: true). */
  parallel_tool_calls: z.boolean().optional(),
  /** Epoch ms after which no worker may start the request (it is dropped with `deadline_exceeded`). Once started,
   *  a request runs to completion or cancel: the requester bounds the total time by cancelling. */
  deadline: z.number().int().positive(),
  /** Subject the worker publishes this request's events to. */
  reply_to: subject,
  /** Epoch ms when the gateway submitted it, for queue-time metrics. */
  submitted_at: z.number().int().positive().optional(),
});
export type RequestMessage = z.infer<typeof RequestMessageSchema>;
/** What a caller fills in before the dispatcher adds the version and reply subject. */
export type RequestMessageInput = z.input<typeof RequestMessageSchema>;

// ---------------------------------------------------------------------------------------------------------------
// Token events (worker -> requester, on reply_to)

/** A token's UTF-8 bytes (OpenAI's logprobs `bytes`), exact also for a piece of a multi-byte character. */
const tokenBytes = z.array(z.number().int().min(0).max(255)).max(64);

export const LogprobSchema = z.object({
  token_id: tokenId,
  token: z.string(),
  bytes: tokenBytes.optional(),
  logprob: z.number(),
  top_logprobs: z
    .array(z.object({ token_id: tokenId, token: z.string(), bytes: tokenBytes.optional(), logprob: z.number() }))
    .optional(),
});
export type Logprob = z.infer<typeof LogprobSchema>;

export const UsageSchema = z.object({
  prompt_tokens: z.number().int().min(0),
  completion_tokens: z.number().int().min(0),
  /** Prompt tokens whose KV came from the prefix cache (OpenAI's prompt_tokens_details.cached_tokens). */
  cached_tokens: z.number().int().min(0),
});
export type Usage = z.infer<typeof UsageSchema>;

const eventBase = {
  v: z.literal(PROTOCOL_VERSION),
  id: requestId,
  /** 0 for the first event of a request, +1 for each next one: the receiver detects gaps and duplicates. */
  seq: z.number().int().min(0),
};

/**
 * A piece of a tool call in a `delta`, as OpenAI streams them: the first piece of call `index` carries its id and
 * function name, later ones more of its arguments (JSON text; the pieces concatenate to the whole).
 */
export const ToolCallDeltaSchema = z.object({
  index: z.number().int().min(0),
  id: z.string().min(1).optional(),
  name: z.string().min(1).optional(),
  arguments: z.string(),
});
export type ToolCallDelta = z.infer<typeof ToolCallDeltaSchema>;

export const TokenEventSchema = z.discriminatedUnion("type", [
  z.object({ ...eventBase, type: z.literal("start"), worker_id: z.string().min(1), queue_ms: z.number().min(0) }),
  z.object({
    ...eventBase,
    type: z.literal("delta"),
    /** Text the model wrote for the user (never the text of a tool call, which comes parsed in tool_calls). */
    text: z.string(),
    token_ids: z.array(tokenId),
    logprobs: z.array(LogprobSchema).optional(),
    tool_calls: z.array(ToolCallDeltaSchema).optional(),
  }),
  /** Sent when a request had no other event for HEARTBEAT_INTERVAL_MS (waiting in the engine, long prefill). */
  z.object({ ...eventBase, type: z.literal("heartbeat") }),
  z.object({
    ...eventBase,
    type: z.literal("final"),
    /** tool_calls: the output ended with tool calls (as OpenAI reports it). */
    finish_reason: z.enum(["stop", "length", "abort", "tool_calls"]),
    usage: UsageSchema,
  }),
  z.object({
    ...eventBase,
    type: z.literal("error"),
    code: z.enum(ERROR_CODES),
    message: z.string(),
    /** The request field at fault (OpenAI's `param`), when one is. */
    param: z.string().optional(),
  }),
]);
export type TokenEvent = z.infer<typeof TokenEventSchema>;
export type TokenEventType = TokenEvent["type"];

/**
 * Sent by a worker (as a NATS request on reply_to) before starting a *redelivered* request: JetStream redelivers
 * when the first worker neither acked nor extended the message in time, which happens both when it died before
 * admission (safe to run again) and when it died mid-stream (running again would duplicate text). Only the
 * requester knows which; it grants the claim iff it has seen no `start` yet.
 */
export const ClaimMessageSchema = z.object({
  v: z.literal(PROTOCOL_VERSION),
  type: z.literal("claim"),
  id: requestId,
  worker_id: z.string().min(1),
});
export type ClaimMessage = z.infer<typeof ClaimMessageSchema>;

export const ClaimReplySchema = z.object({
  v: z.literal(PROTOCOL_VERSION),
  id: requestId,
  granted: z.boolean(),
});
export type ClaimReply = z.infer<typeof ClaimReplySchema>;

/** Anything a requester can receive on its reply subject. */
export type ReplyMessage = TokenEvent | ClaimMessage;

// ---------------------------------------------------------------------------------------------------------------
// Cancel and load report

export const CancelMessageSchema = z.object({ v: z.literal(PROTOCOL_VERSION), id: requestId });
export type CancelMessage = z.infer<typeof CancelMessageSchema>;

export const LoadReportSchema = z.object({
  v: z.literal(PROTOCOL_VERSION),
  worker_id: z.string().min(1),
  pool: z.string(),
  model: z.string(),
  /** Epoch ms when the report was taken. */
  ts: z.number().int(),
  running: z.number().int().min(0),
  waiting: z.number().int().min(0),
  max_num_seqs: z.number().int().min(1),
  kv_blocks_total: z.number().int().min(0),
  kv_blocks_free: z.number().int().min(0),
  /** Used / total KV blocks, 0..1. */
  kv_usage: z.number().min(0).max(1),
  prefix_cache: z.object({
    block_size: z.number().int().min(1),
    hit_rate: z.number().min(0).max(1),
    /** Hashes of (some of) the blocks the worker can serve from cache, most recently used first. */
    block_hashes: z.array(z.string()).max(4096),
  }),
  tokens_per_second: z.number().min(0),
  /** True once the worker stopped taking requests (SIGTERM); routing should skip it. */
  draining: z.boolean(),
  /** Where this worker takes addressed requests (see PoolNames.direct); absent if it takes none. */
  direct_subject: z.string().optional(),
});
export type LoadReport = z.infer<typeof LoadReportSchema>;

/** A worker's immediate answer to an addressed request: accepted only if it started it, as if pulled. */
export const DirectReplySchema = z.object({ v: z.literal(PROTOCOL_VERSION), id: requestId, accepted: z.boolean() });
export type DirectReply = z.infer<typeof DirectReplySchema>;

// ---------------------------------------------------------------------------------------------------------------
// Encoding and parsing

export type ParseResult<T> = { ok: true; value: T } | ParseFailure;

/** A rejected message, with the request id and reply subject when they could be recovered from it (so the
 *  receiver can answer with an error event). */
export interface ParseFailure {
  ok: false;
  code: ErrorCode;
  message: string;
  id?: string;
  replyTo?: string;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: false });

export function encodeMessage(
  msg: RequestMessage | TokenEvent | ClaimMessage | ClaimReply | CancelMessage | LoadReport,
): Uint8Array {
  return encoder.encode(JSON.stringify(msg));
}

function decodeJson(data: Uint8Array): { ok: true; value: unknown } | { ok: false; message: string } {
  try {
    return { ok: true, value: JSON.parse(decoder.decode(data)) };
  } catch (e) {
    return { ok: false, message: `not UTF-8 JSON: ${(e as Error).message}` };
  }
}

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

function describe(error: z.ZodError): string {
  return error.issues
    .slice(0, 5)
    .map((i) => `${i.path.join(".") || "(root)"}: ${i.message}`)
    .join("; ");
}

/** Parses and validates a message of any kind, checking the version first so an old or new peer gets a clear
 *  `unsupported_version` rather than a list of schema errors. */
function parseWith<T>(data: Uint8Array, schema: z.ZodType<T>, maxBytes = Number.POSITIVE_INFINITY): ParseResult<T> {
  const json = decodeJson(data);
  const raw = json.ok && isRecord(json.value) ? json.value : undefined;
  // Recovered only if well-formed: an error event must never go to a subject the sender did not mean.
  const id = requestId.safeParse(raw?.id);
  const replyTo = subject.safeParse(raw?.reply_to);
  const fail = (code: ErrorCode, message: string): ParseFailure => ({
    ok: false,
    code,
    message,
    ...(id.success ? { id: id.data } : {}),
    ...(replyTo.success ? { replyTo: replyTo.data } : {}),
  });
  if (data.byteLength > maxBytes) return fail("too_large", `message is ${data.byteLength} bytes, limit ${maxBytes}`);
  if (!json.ok) return fail("bad_request", json.message);
  if (!raw) return fail("bad_request", "message is not a JSON object");
  if (raw.v !== PROTOCOL_VERSION) {
    return fail("unsupported_version", `protocol version ${JSON.stringify(raw.v)}, supported: ${PROTOCOL_VERSION}`);
  }
  const parsed = schema.safeParse(raw);
  return parsed.success ? { ok: true, value: parsed.data } : fail("bad_request", describe(parsed.error));
}

/** Validates a request as a worker receives it (size limit included). */
export const parseRequestMessage = (data: Uint8Array): ParseResult<RequestMessage> =>
  parseWith(data, RequestMessageSchema, MAX_REQUEST_BYTES);

const ReplyMessageSchema = z.union([TokenEventSchema, ClaimMessageSchema]);
/** Validates what a requester receives on its reply subject: a token event or a claim. */
export const parseReplyMessage = (data: Uint8Array): ParseResult<ReplyMessage> => parseWith(data, ReplyMessageSchema);
export const parseClaimReply = (data: Uint8Array): ParseResult<ClaimReply> => parseWith(data, ClaimReplySchema);
export const parseCancelMessage = (data: Uint8Array): ParseResult<CancelMessage> =>
  parseWith(data, CancelMessageSchema);
export const parseLoadReport = (data: Uint8Array): ParseResult<LoadReport> => parseWith(data, LoadReportSchema);
