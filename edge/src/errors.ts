/**
 * OpenAI-shaped errors. Every failure the gateway answers is `{"error": {"message", "type", "param", "code"}}` with
 * the status OpenAI would use, so the official clients raise their matching typed errors (BadRequestError,
 * AuthenticationError, NotFoundError, RateLimitError, ...). Code throws `apiError(...)`; `app.onError` returns it.
 *
 * @module
 */
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";

/** The `error` object of an OpenAI error body, plus the HTTP status it travels with. Plain data: it crosses the
 *  Durable Object RPC boundary inside job events. */
export interface ApiErrorInfo {
  status: number;
  message: string;
  type: string;
  param: string | null;
  code: string | null;
}

export function errorBody(e: ApiErrorInfo): { error: Omit<ApiErrorInfo, "status"> } {
  return { error: { message: e.message, type: e.type, param: e.param, code: e.code } };
}

export function errorResponse(e: ApiErrorInfo, headers?: HeadersInit): Response {
  const h = new Headers(headers);
  h.set("content-type", "application/json");
  return new Response(JSON.stringify(errorBody(e)), { status: e.status, headers: h });
}

/** An HTTPException carrying a ready OpenAI error response (Hono's pattern: the central handler just returns it). */
export class ApiError extends HTTPException {
  readonly info: ApiErrorInfo;
  constructor(info: ApiErrorInfo, headers?: HeadersInit) {
    super(info.status as ContentfulStatusCode, { res: errorResponse(info, headers), message: info.message });
    this.info = info;
  }
}

export function apiError(
  status: number,
  message: string,
  opts: { type?: string; param?: string | null; code?: string | null; headers?: HeadersInit } = {},
): ApiError {
  return new ApiError(
    {
      status,
      message,
      type: opts.type ?? (status >= 500 ? "server_error" : "invalid_request_error"),
      param: opts.param ?? null,
      code: opts.code ?? null,
    },
    opts.headers,
  );
}

// ---------------------------------------------------------------------------------------------------------------
// The gateway's errors, one constructor each (messages follow OpenAI's wording where one exists)

export const errors = {
  invalidRequest: (message: string, param: string | null = null, code: string | null = null) =>
    apiError(400, message, { param, code }),

  malformedJson: () =>
    apiError(
      400,
      "We could not parse the JSON body of your request. The body must be a JSON object sent with " +
        "Content-Type: application/json.",
    ),

  bodyTooLarge: (limitBytes: number) =>
    apiError(413, `Request body too large: the limit is ${limitBytes} bytes.`, { code: "request_too_large" }),

  missingApiKey: () =>
    apiError(
      401,
      "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer " +
        "auth (i.e. Authorization: Bearer YOUR_KEY).",
    ),

  invalidApiKey: (hint: string) => apiError(401, `Incorrect API key provided: ${hint}.`, { code: "invalid_api_key" }),

  revokedApiKey: (hint: string) => apiError(401, `The API key ${hint} has been revoked.`, { code: "invalid_api_key" }),

  invalidAdminSecret: () => apiError(401, "Invalid admin credentials.", { code: "invalid_api_key" }),

  modelNotFound: (model: string) =>
    apiError(404, `The model '${model}' does not exist or you do not have access to it.`, {
      param: "model",
      code: "model_not_found",
    }),

  notFound: (what: string) => apiError(404, what, { code: "not_found" }),

  contextLengthExceeded: (message: string, param: string) =>
    apiError(400, message, { param, code: "context_length_exceeded" }),

  serviceUnavailable: (message: string) => apiError(503, message, { code: "service_unavailable" }),

  /** The client went away before an answer (nginx's 499: nobody reads it, but logs and metrics do). */
  clientClosed: () => apiError(499, "The client closed the request.", { code: "cancelled" }),

  internal: () => apiError(500, "The server had an error while processing your request.", { code: "internal_error" }),
};

/** `sk-...abcd`: enough to recognise a key in an error message or a listing, useless to an attacker. */
export function keyHint(key: string): string {
  return key.length <= 8 ? "sk-***" : `${key.slice(0, 3)}...${key.slice(-4)}`;
}
