/**
 * Request bodies of the OpenAI API as the gateway accepts them. As OpenAI does: unknown fields are ignored
 * (z.object strips them), `null` means "not set", and a wrong type is a 400 naming the parameter. vLLM's sampling
 * extras (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids) are accepted the way vLLM accepts them.
 *
 * @module
 */
import { z } from "zod";
import { type ApiError, errors } from "../errors.ts";

/** OpenAI allows 128; each choice is a separate sequence on a worker, so the gateway keeps it modest. */
export const MAX_N = 16;
/** Prompts in one /v1/completions request. */
export const MAX_PROMPTS = 64;
/** Worker sequences one request may start (prompts × n): OpenAI's cap on n. */
export const MAX_SEQUENCES = 128;
/** Stop sequences: OpenAI's limit, and a bound on each one's length (the worker matches them at every step). */
export const MAX_STOP = 4;
export const MAX_STOP_LENGTH = 256;
/** Entries of logit_bias (OpenAI's limit). */
export const MAX_LOGIT_BIAS = 300;

const nullish = <T extends z.ZodType>(t: T) => t.nullish();

const tokenId = z.number().int().min(0);

const stopString = z.string().max(MAX_STOP_LENGTH);
const stop = nullish(z.union([stopString, z.array(stopString).max(MAX_STOP)]));

const logitBias = z
  .record(z.string().regex(/^\d{1,10}$/, "keys must be token ids"), z.number().min(-100).max(100))
  .refine((o) => Object.keys(o).length <= MAX_LOGIT_BIAS, `at most ${MAX_LOGIT_BIAS} entries`);

/**
 * Parameters both endpoints share, with OpenAI's ranges (vLLM's for its extras), finite numbers only (zod's
 * number). repetition_penalty divides logits: its floor keeps the quotient finite in float32.
 */
const common = {
  model: z.string().min(1),
  temperature: nullish(z.number().min(0).max(2)),
  top_p: nullish(z.number().gt(0).max(1)),
  n: nullish(z.number().int().min(1).max(MAX_N)),
  stop,
  seed: nullish(z.number().int()),
  presence_penalty: nullish(z.number().min(-2).max(2)),
  frequency_penalty: nullish(z.number().min(-2).max(2)),
  logit_bias: nullish(logitBias),
  user: nullish(z.string()),
  stream: nullish(z.boolean()),
  stream_options: nullish(z.object({ include_usage: nullish(z.boolean()) })),
  max_tokens: nullish(z.number().int().min(1)),
  // vLLM extras
  top_k: nullish(z.number().int().min(-1)),
  min_p: nullish(z.number().min(0).max(1)),
  repetition_penalty: nullish(z.number().min(0.01).max(2)),
  ignore_eos: nullish(z.boolean()),
  stop_token_ids: nullish(z.array(tokenId).max(64)),
};

const textPart = z.object({ type: z.string(), text: z.string().optional() }).superRefine((part, ctx) => {
  if (part.type !== "text") {
    ctx.addIssue({
      code: "custom",
      path: ["type"],
      message: `Unsupported content part type '${part.type}': this model accepts text only.`,
    });
  } else if (part.text === undefined) {
    ctx.addIssue({ code: "invalid_type", expected: "string", path: ["text"], message: "text is required" });
  }
});

const chatMessage = z.object({
  // developer is OpenAI's newer name for system; tool calling is not supported by the engine.
  role: z.enum(["system", "developer", "user", "assistant"]),
  content: z.union([z.string(), z.array(textPart), z.null()]),
  name: nullish(z.string()),
});

export const ChatCompletionRequestSchema = z.object({
  ...common,
  messages: z.array(chatMessage).min(1),
  max_completion_tokens: nullish(z.number().int().min(1)),
  logprobs: nullish(z.boolean()),
  top_logprobs: nullish(z.number().int().min(0).max(20)),
});
export type ChatCompletionRequest = z.infer<typeof ChatCompletionRequestSchema>;

export const CompletionRequestSchema = z.object({
  ...common,
  prompt: z.union([
    z.string(),
    z.array(z.string()).min(1).max(MAX_PROMPTS),
    z.array(tokenId).min(1),
    z.array(z.array(tokenId).min(1)).min(1).max(MAX_PROMPTS),
  ]),
  /** Completions return per-token logprobs with this many alternatives (OpenAI allows 0..5). */
  logprobs: nullish(z.number().int().min(0).max(5)),
  echo: nullish(z.boolean()),
  suffix: nullish(z.string()),
  best_of: nullish(z.number().int().min(1)),
});
export type CompletionRequest = z.infer<typeof CompletionRequestSchema>;

// ---------------------------------------------------------------------------------------------------------------
// Validation with OpenAI-style errors

/** `messages[0].content`, as OpenAI names nested parameters. */
export function paramName(path: readonly PropertyKey[]): string {
  let out = "";
  for (const p of path) {
    if (typeof p === "number") out += `[${p}]`;
    else out += out === "" ? String(p) : `.${String(p)}`;
  }
  return out;
}

function valueAt(body: unknown, path: readonly PropertyKey[]): unknown {
  let v = body;
  for (const p of path) {
    if (typeof v !== "object" || v === null) return undefined;
    v = (v as Record<PropertyKey, unknown>)[p];
  }
  return v;
}

function jsonType(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "number") return Number.isInteger(v) ? "an integer" : "a decimal";
  if (typeof v === "object") return "an object";
  return `a ${typeof v}`;
}

/**
 * The most telling issue of a failed union: the deepest one (for `stop: [1]` that is `stop[0]`, not "stop is
 * not a string"), and at equal depth the branch whose type matched (five stop strings: "too many", not "not a
 * string").
 */
function deepestIssue(issue: z.core.$ZodIssue): z.core.$ZodIssue {
  if (issue.code !== "invalid_union" || issue.errors.length === 0) return issue;
  const rank = (i: z.core.$ZodIssue) => i.path.length * 2 + (i.code === "invalid_type" ? 0 : 1);
  let best: z.core.$ZodIssue | undefined;
  for (const branch of issue.errors) {
    for (const sub of branch) {
      const candidate = deepestIssue({ ...sub, path: [...issue.path, ...sub.path] } as z.core.$ZodIssue);
      if (!best || rank(candidate) > rank(best)) best = candidate;
    }
  }
  return best && (best.path.length > issue.path.length || best.code !== "invalid_type") ? best : issue;
}

/** The first issue, as OpenAI reports one: missing parameter, wrong type, or an invalid value, naming `param`. */
export function toApiError(body: unknown, error: z.ZodError): ApiError {
  const issue = deepestIssue(error.issues[0]!);
  const param = paramName(issue.path);
  const value = valueAt(body, issue.path);
  if (issue.path.length > 0 && value === undefined) {
    return errors.invalidRequest(`Missing required parameter: '${param}'.`, param, "missing_required_parameter");
  }
  if (typeof value === "number" && !Number.isFinite(value)) {
    // JSON numbers like 1e999 parse to Infinity
    return errors.invalidRequest(`Invalid '${param}': expected a finite number.`, param, "invalid_value");
  }
  if (issue.code === "invalid_type" || issue.code === "invalid_union") {
    const expected = issue.code === "invalid_type" ? String(issue.expected) : "one of the documented types";
    return errors.invalidRequest(
      `Invalid type for '${param}': expected ${expected}, but got ${jsonType(value)} instead.`,
      param,
      "invalid_type",
    );
  }
  return errors.invalidRequest(`Invalid '${param}': ${issue.message}`, param || null, "invalid_value");
}

export function parseRequest<T>(schema: z.ZodType<T>, body: unknown): T {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw errors.invalidRequest("The request body must be a JSON object.");
  }
  const parsed = schema.safeParse(body);
  if (!parsed.success) throw toApiError(body, parsed.error);
  return parsed.data;
}
