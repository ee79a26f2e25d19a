/**
 * CORS for the OpenAI API, so browsers can call it as they call OpenAI's (keys travel in the Authorization header,
 * never in cookies: no credentials mode). Hono's `cors` does the work; this adds what it cannot express:
 *
 * - request headers allowed by pattern: those the official `openai` SDK sends (`x-stainless-*`, `openai-*`,
 *   `authorization`, `content-type`, `accept`, `idempotency-key`), including ones a later SDK version adds;
 * - CORS headers on every answer, also an error response that replaced the one they were set on (401, 429), or
 *   the browser hides it from the page.
 *
 * @module
 */
import type { Context, MiddlewareHandler } from "hono";
import { cors } from "hono/cors";

const ALLOWED_HEADERS = new Set(["authorization", "content-type", "accept", "idempotency-key", "x-request-id"]);
const ALLOWED_PREFIXES = ["x-stainless-", "openai-"];

/** What a page may read: OpenAI's rate-limit and retry headers, the request id, the serving worker. */
export const EXPOSED_HEADERS = [
  "x-request-id",
  "x-ratelimit-limit-requests",
  "x-ratelimit-limit-tokens",
  "x-ratelimit-remaining-requests",
  "x-ratelimit-remaining-tokens",
  "x-ratelimit-reset-requests",
  "x-ratelimit-reset-tokens",
  "retry-after",
  "retry-after-ms",
  "x-should-retry",
  "x-llama-edge-worker",
];

const allowedHeader = (h: string) => ALLOWED_HEADERS.has(h) || ALLOWED_PREFIXES.some((p) => h.startsWith(p));

/** The requested headers a preflight may allow. */
function allowHeaders(c: Context): string[] {
  const requested = c.req.header("access-control-request-headers") ?? "";
  return requested
    .split(",")
    .map((h) => h.trim().toLowerCase())
    .filter((h) => h !== "" && allowedHeader(h));
}

/** @param origins allowed origins (exact, e.g. `https://app.example.com`), or `["*"]` for any */
export function apiCors(opts: { origins: string[] }): MiddlewareHandler {
  const origin = opts.origins.includes("*") ? "*" : opts.origins;
  const base = {
    origin,
    allowMethods: ["GET", "POST", "OPTIONS"],
    exposeHeaders: EXPOSED_HEADERS,
    maxAge: 86_400,
  };
  const actual = cors(base);
  const exposed = EXPOSED_HEADERS.join(",");
  const allowedOrigin = (o: string | undefined) => (origin === "*" ? "*" : o && origin.includes(o) ? o : undefined);
  return async function apiCorsMiddleware(c, next) {
    if (c.req.method === "OPTIONS") return cors({ ...base, allowHeaders: allowHeaders(c) })(c, next);
    await actual(c, next);
    const allow = allowedOrigin(c.req.header("origin"));
    if (allow && !c.res.headers.has("access-control-allow-origin")) {
      c.header("access-control-allow-origin", allow);
      c.header("access-control-expose-headers", exposed);
      if (allow !== "*") c.header("vary", "Origin", { append: true });
    }
  };
}
