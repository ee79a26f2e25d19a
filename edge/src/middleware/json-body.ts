/**
 * Reads the request body as JSON with a size limit: 413 above `maxBytes` (from Content-Length before reading a
 * byte, else while reading), 400 for anything that is not JSON. The parsed value is `c.var.body`.
 *
 * @module
 */
import type { MiddlewareHandler } from "hono";
import { errors } from "../errors.ts";

export type JsonBodyVars = { body: unknown };

export function jsonBody(opts: { maxBytes: number }): MiddlewareHandler<{ Variables: JsonBodyVars }> {
  if (!Number.isInteger(opts.maxBytes) || opts.maxBytes < 1) throw new TypeError("jsonBody: maxBytes must be >= 1");
  const { maxBytes } = opts;
  return async function jsonBodyMiddleware(c, next) {
    const length = c.req.header("content-length");
    const declared = length === undefined ? Number.NaN : Number(length);
    if (declared > maxBytes) throw errors.bodyTooLarge(maxBytes);
    // With a Content-Length the body cannot be longer (HTTP framing): read it in one go. Without one (chunked),
    // count while reading.
    const text = Number.isFinite(declared) ? await c.req.raw.text() : await readLimited(c.req.raw, maxBytes);
    try {
      c.set("body", JSON.parse(text));
    } catch {
      throw errors.malformedJson();
    }
    await next();
  };
}

/** The body as text, failing with 413 as soon as it passes `maxBytes` (a chunked body has no Content-Length). */
async function readLimited(req: Request, maxBytes: number): Promise<string> {
  if (!req.body) return "";
  const reader = req.body.getReader();
  const decoder = new TextDecoder();
  let size = 0;
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > maxBytes) {
      await reader.cancel().catch(() => {});
      throw errors.bodyTooLarge(maxBytes);
    }
    text += decoder.decode(value, { stream: true });
  }
  return text + decoder.decode();
}
