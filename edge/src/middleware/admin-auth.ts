/**
 * The admin API's guard: `Authorization: Bearer <ADMIN_SECRET>` through Hono's bearer-auth (constant-time
 * comparison). A missing or too-short secret disables the admin API, with an error in the log, and nothing else:
 * inference does not depend on it.
 *
 * @module
 */
import type { MiddlewareHandler } from "hono";
import { bearerAuth } from "hono/bearer-auth";
import { apiError, errors } from "../errors.ts";

/** Shorter secrets are guessable: the admin API stays off with one. */
export const MIN_ADMIN_SECRET_LENGTH = 16;

export function adminAuth(opts: { secret: string | undefined }): MiddlewareHandler {
  const { secret } = opts;
  const problem =
    secret === undefined || secret === ""
      ? "ADMIN_SECRET is not set"
      : secret.length < MIN_ADMIN_SECRET_LENGTH
        ? `ADMIN_SECRET is shorter than ${MIN_ADMIN_SECRET_LENGTH} characters`
        : undefined;
  if (problem !== undefined) {
    console.error(`admin API disabled: ${problem} (set it with \`wrangler secret put ADMIN_SECRET\`)`);
    return async function adminDisabled() {
      throw apiError(401, `The admin API is disabled: ${problem}.`, { code: "admin_disabled" });
    };
  }
  const refused = () => errors.invalidAdminSecret().getResponse();
  return bearerAuth({
    token: secret as string,
    noAuthenticationHeader: { message: refused },
    invalidAuthenticationHeader: { message: refused },
    invalidToken: { message: refused },
  });
}
