/**
 * `POST /v1/chat/completions`. Messages and tools go to the worker as they are: the chat template is rendered
 * there, with the model's own tokenizer (see shared/src/protocol.ts), and tool calls are parsed there too.
 *
 * @module
 */
import type { ChatMessage } from "@llama-edge/shared";
import { Hono } from "hono";
import type { RequestIdVariables } from "hono/request-id";
import type { JobOutput } from "../dispatch/job.ts";
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
    content:
      m.content == null ? null : typeof m.content === "string" ? m.content : m.content.map((p) => p.text).join("\n"),
    ...(m.tool_calls ? { tool_calls: m.tool_calls } : {}),
    ...(m.tool_call_id ? { tool_call_id: m.tool_call_id } : {}),
    ...(m.name ? { name: m.name } : {}),
  }));
}

/** response_format and the tool options, checked against each other as OpenAI checks them. */
function toOutput(req: ChatCompletionRequest): JobOutput {
  const out: JobOutput = {};
  if (req.response_format) out.response_format = req.response_format;
  const { tools, tool_choice: choice } = req;
  if (!tools) {
    for (const param of ["tool_choice", "parallel_tool_calls"] as const) {
      if (req[param] != null) {
        throw errors.invalidRequest(
          `Invalid value for '${param}': only allowed when 'tools' are given.`,
          param,
          "invalid_value",
        );
      }
    }
    return out;
  }
  if (typeof choice === "object" && choice !== null && !tools.some((t) => t.function.name === choice.function.name)) {
    throw errors.invalidRequest(
      `Invalid value for 'tool_choice': function '${choice.function.name}' is not in 'tools'.`,
      "tool_choice",
      "invalid_value",
    );
  }
  if (choice !== "none" && req.response_format && req.response_format.type !== "text") {
    throw errors.invalidRequest(
      `'response_format' ${req.response_format.type} cannot be combined with tool calls (use tool_choice "none").`,
      "response_format",
      "invalid_value",
    );
  }
  if (choice != null) out.tool_choice = choice;
  if (req.parallel_tool_calls != null) out.parallel_tool_calls = req.parallel_tool_calls;
  return out;
}

export function chatCompletionsRoute(deps: InferenceDeps) {
  return new Hono<{ Variables: AuthVars & JsonBodyVars & RequestIdVariables }>().post("/", async (c) => {
    const req = parseRequest(ChatCompletionRequestSchema, c.get("body"));
    if (req.top_logprobs != null && req.logprobs !== true) {
      throw errors.invalidRequest("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs", "invalid_value");
    }
    const output = toOutput(req);
    const maxTokens = req.max_completion_tokens ?? req.max_tokens ?? null;
    const logprobs = req.logprobs === true;
    return runInference(c, deps, {
      kind: "chat",
      model: req.model,
      prompts: [
        {
          type: "chat",
          messages: toMessages(req),
          add_generation_prompt: true,
          ...(req.tools ? { tools: req.tools } : {}),
        },
      ],
      n: req.n ?? 1,
      sampling: samplingParams(req, maxTokens, { logprobs, topLogprobs: req.top_logprobs ?? 0 }),
      output,
      maxTokens,
      maxTokensParam: req.max_completion_tokens != null ? "max_completion_tokens" : "max_tokens",
      stream: req.stream === true,
      includeUsage: req.stream === true && req.stream_options?.include_usage === true,
      logprobs,
      makeFormatter: (o) => new ChatFormatter(o),
    });
  });
}
