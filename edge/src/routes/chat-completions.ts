/**
 * `POST /v1/chat/completions`. Messages go to the worker as they are: the chat template is rendered there, with
 * the model's own tokenizer (see shared/src/protocol.ts).
 *
 * @module
 */
import type { ChatMessage } from "@llama-edge/shared";
import { Hono } from "hono";
import type { RequestIdVariables } from "hono/request-id";
import { errors } from "../errors.ts";
import { type InferenceDeps, runInference } from "../inference.ts";
import type { AuthVars } from "../middleware/auth.ts";
import type { JsonBodyVars } from "../middleware/json-body.ts";
import { ChatFormatter } from "../openai/format.ts";
import { type ChatCompletionRequest, ChatCompletionRequestSchema, parseRequest } from "../openai/schemas.ts";
import { samplingParams } from "./sampling.ts";

function toMessages(req: ChatCompletionRequest): ChatMessage[] {
  return req.messages.map((m) => ({
    role: m.role === "developer" ? "system" : m.role,
    content: typeof m.content === "string" ? m.content : (m.content ?? []).map((p) => p.text ?? "").join("\n"),
  }));
}

export function chatCompletionsRoute(deps: InferenceDeps) {
  return new Hono<{ Variables: AuthVars & JsonBodyVars & RequestIdVariables }>().post("/", async (c) => {
    const req = parseRequest(ChatCompletionRequestSchema, c.get("body"));
    if (req.top_logprobs != null && req.logprobs !== true) {
      throw errors.invalidRequest("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs", "invalid_value");
    }
    const maxTokens = req.max_completion_tokens ?? req.max_tokens ?? null;
    const logprobs = req.logprobs === true;
    return runInference(c, deps, {
      kind: "chat",
      model: req.model,
      prompts: [{ type: "chat", messages: toMessages(req), add_generation_prompt: true }],
      n: req.n ?? 1,
      sampling: samplingParams(req, maxTokens, { logprobs, topLogprobs: req.top_logprobs ?? 0 }),
      maxTokens,
      maxTokensParam: req.max_completion_tokens != null ? "max_completion_tokens" : "max_tokens",
      stream: req.stream === true,
      includeUsage: req.stream === true && req.stream_options?.include_usage === true,
      logprobs,
      makeFormatter: (o) => new ChatFormatter(o),
    });
  });
}
