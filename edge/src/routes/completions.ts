/**
 * `POST /v1/completions` (legacy completions): a prompt as a string, an array of strings, token ids, or an array
 * of token-id arrays; each prompt gets `n` choices, numbered promptIndex * n + i as OpenAI numbers them.
 *
 * @module
 */
import type { Prompt } from "@llama-edge/shared";
import { Hono } from "hono";
import type { RequestIdVariables } from "hono/request-id";
import { errors } from "../errors.ts";
import { type InferenceDeps, runInference } from "../inference.ts";
import type { AuthVars } from "../middleware/auth.ts";
import type { JsonBodyVars } from "../middleware/json-body.ts";
import { CompletionFormatter } from "../openai/format.ts";
import { type CompletionRequest, CompletionRequestSchema, parseRequest } from "../openai/schemas.ts";
import { samplingParams } from "./sampling.ts";

/** OpenAI's default for this endpoint (chat has none). */
const DEFAULT_MAX_TOKENS = 16;

function toPrompts(prompt: CompletionRequest["prompt"]): Prompt[] {
  if (typeof prompt === "string") return [{ type: "text", text: prompt }];
  if (prompt.every((p) => typeof p === "string")) return prompt.map((text) => ({ type: "text", text }));
  if (prompt.every((p) => typeof p === "number")) return [{ type: "tokens", token_ids: prompt }];
  return (prompt as number[][]).map((token_ids) => ({ type: "tokens", token_ids }));
}

export function completionsRoute(deps: InferenceDeps) {
  return new Hono<{ Variables: AuthVars & JsonBodyVars & RequestIdVariables }>().post("/", async (c) => {
    const req = parseRequest(CompletionRequestSchema, c.get("body"));
    const n = req.n ?? 1;
    if (req.suffix) throw errors.invalidRequest("'suffix' is not supported by this model.", "suffix", "invalid_value");
    if (req.best_of != null && req.best_of !== n) {
      throw errors.invalidRequest("'best_of' is not supported (other than equal to n).", "best_of", "invalid_value");
    }
    const prompts = toPrompts(req.prompt);
    if (req.echo && prompts.some((p) => p.type !== "text")) {
      throw errors.invalidRequest("'echo' is only supported with text prompts.", "echo", "invalid_value");
    }
    // Each choice echoes its own prompt: choice i belongs to prompt floor(i / n).
    const echo = prompts.flatMap((p) =>
      Array.from({ length: n }, () => (req.echo && p.type === "text" ? p.text : null)),
    );
    const maxTokens = req.max_tokens ?? DEFAULT_MAX_TOKENS;
    const logprobs = req.logprobs != null;
    return runInference(c, deps, {
      kind: "completion",
      model: req.model,
      prompts,
      n,
      sampling: samplingParams(req, maxTokens, { logprobs, topLogprobs: req.logprobs ?? 0 }),
      maxTokens,
      maxTokensParam: "max_tokens",
      stream: req.stream === true,
      includeUsage: req.stream === true && req.stream_options?.include_usage === true,
      logprobs,
      makeFormatter: (o) => new CompletionFormatter(o, echo),
    });
  });
}
