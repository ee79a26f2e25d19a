/**
 * Admission results as HTTP: OpenAI's x-ratelimit-* headers and the 401/404/429 answers for refused requests.
 *
 * @module
 */
import { type ApiError, apiError, errors } from "./errors.ts";
import type { AdmitResult, RateInfo } from "./keys/key-limiter.ts";

/** OpenAI's duration format: "20ms", "1s", "6m0s", "1.5s". */
export function formatDuration(ms: number): string {
  const v = Math.max(0, Math.ceil(ms));
  if (v < 1000) return `${v}ms`;
  const minutes = Math.floor(v / 60_000);
  const seconds = Number(((v % 60_000) / 1000).toFixed(3));
  return minutes > 0 ? `${minutes}m${seconds}s` : `${seconds}s`;
}

export function rateLimitHeaders(rate: RateInfo | undefined): Record<string, string> {
  const h: Record<string, string> = {};
  if (rate?.requests) {
    h["x-ratelimit-limit-requests"] = String(rate.requests.limit);
    h["x-ratelimit-remaining-requests"] = String(Math.max(0, rate.requests.remaining));
    h["x-ratelimit-reset-requests"] = formatDuration(rate.requests.resetMs);
  }
  if (rate?.tokens) {
    h["x-ratelimit-limit-tokens"] = String(rate.tokens.limit);
    h["x-ratelimit-remaining-tokens"] = String(Math.max(0, rate.tokens.remaining));
    h["x-ratelimit-reset-tokens"] = formatDuration(rate.tokens.resetMs);
  }
  return h;
}

/** The error for a refused admission. */
export function admissionError(r: Extract<AdmitResult, { ok: false }>, keyHint: string, model: string): ApiError {
  const headers = rateLimitHeaders(r.rate);
  switch (r.reason) {
    case "invalid_key":
      return errors.invalidApiKey(keyHint);
    case "revoked":
      return errors.revokedApiKey(keyHint);
    case "model_not_allowed":
      return errors.modelNotFound(model);
    case "quota":
      // Retrying cannot help until the period ends: tell OpenAI's clients not to (they honour x-should-retry).
      return apiError(429, r.message, {
        type: "insufficient_quota",
        code: "insufficient_quota",
        headers: { ...headers, "x-should-retry": "false" },
      });
    case "request_too_large":
      return apiError(429, r.message, {
        type: "tokens",
        code: "rate_limit_exceeded",
        headers: { ...headers, "x-should-retry": "false" },
      });
    case "too_many_sequences":
      return apiError(429, r.message, {
        type: "requests",
        code: "rate_limit_exceeded",
        headers: { ...headers, "x-should-retry": "false" },
      });
    default: {
      const retryMs = Math.max(1, Math.ceil(r.retryAfterMs ?? 1000));
      return apiError(429, `${r.message} Please try again in ${formatDuration(retryMs)}.`, {
        type: r.reason === "tokens" ? "tokens" : "requests",
        code: "rate_limit_exceeded",
        headers: { ...headers, "retry-after": String(Math.ceil(retryMs / 1000)), "retry-after-ms": String(retryMs) },
      });
    }
  }
}
