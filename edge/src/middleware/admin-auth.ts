/**
 * The admin API's guard: `Authorization: Bearer <ADMIN_SECRET>`, compared in constant time. Without a secret the
 * admin API is disabled (every call is 401) rather than open.
 *
 * @module
 */
import type { MiddlewareHandler } from "hono";
import { apiError, errors } from "../errors.ts";
import { secretsEqual } from "../keys/api-key.ts";

/** Shorter secrets are guessable; refuse to run with one. */
export const MIN_ADMIN_SECRET_LENGTH = 16;

export function adminAuth(opts: { secret: string | undefined }): MiddlewareHandler {
  const { secret } = opts;
  if (secret !== undefined && secret.length < MIN_ADMIN_SECRET_LENGTH) {
    throw new TypeError(`adminAuth: ADMIN_SECRET must be at least ${MIN_ADMIN_SECRET_LENGTH} characters`);
  }
  return async function adminAuthMiddleware(c, next) {
    if (secret === undefined) {
      throw apiError(401, "The admin API is disabled: set the ADMIN_SECRET secret to enable it.", {
        code: "admin_disabled",
      });
    }
    const token = /^Bearer\s+(\S+)\s*$/i.exec(c.req.header("authorization") ?? "")?.[1];
    if (!token || !(await secretsEqual(token, secret))) throw errors.invalidAdminSecret();
    await next();
  };
}
