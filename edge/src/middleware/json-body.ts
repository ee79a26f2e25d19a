/**
 * Reads the request body as JSON with a size limit (Hono's body-limit: from Content-Length before reading a byte,
 * else while reading): 413 above `maxBytes`, 400 for anything that is not JSON. The parsed value is `c.var.body`.
 *
 * @module
 */
import type { MiddlewareHandler } from "hono";
import { bodyLimit } from "hono/body-limit";
import { errors } from "../errors.ts";

export type JsonBodyVars = { body: unknown };

export function jsonBody(opts: { maxBytes: number }): MiddlewareHandler<{ Variables: JsonBodyVars }> {
  if (!Number.isInteger(opts.maxBytes) || opts.maxBytes < 1) throw new TypeError("jsonBody: maxBytes must be >= 1");
  const { maxBytes } = opts;
  const limit = bodyLimit({
    maxSize: maxBytes,
    onError: () => {
      throw errors.bodyTooLarge(maxBytes);
    },
  });
  return async function jsonBodyMiddleware(c, next) {
    await limit(c, async () => {
      try {
        c.set("body", JSON.parse(await c.req.text()));
      } catch {
        throw errors.malformedJson();
      }
      await next();
    });
  };
}
