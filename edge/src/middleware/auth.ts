/**
 * API key authentication. The middleware (Hono's bearer-auth) only checks the key's format and checksum and
 * hashes it (no round trip): a key this gateway never issued is a 401 without touching a Durable Object. On
 * inference routes the key's Durable Object authenticates and admits in one call. Routes that admit nothing call
 * `requireKey`, which asks the key's Durable Object once per request.
 *
 * @module
 */
import type { Context, MiddlewareHandler } from "hono";
import { bearerAuth } from "hono/bearer-auth";
import { HTTPException } from "hono/http-exception";
import { errors, keyHint } from "../errors.ts";
import { hashApiKey, keyFormat } from "../keys/api-key.ts";
import type { KeyStore } from "../keys/key-store.ts";
import type { KeyInfo } from "../keys/types.ts";

export type AuthVars = {
  /** SHA-256 hex of the presented key: the name of its Durable Object. */
  keyHash: string;
  /** `sk-...abcd`, for error messages. */
  keyHint: string;
  /** Set once `requireKey` has authenticated the key in this request. */
  key?: KeyInfo;
};

/** The bearer token as presented, for the hint in an error message. */
const presented = (c: Context): string => (c.req.header("authorization") ?? "").replace(/^\S+\s*/, "");

export function apiKeyAuth(opts: { acceptLegacyKeys: boolean }): MiddlewareHandler<{ Variables: AuthVars }> {
  const missing = () => errors.missingApiKey().getResponse();
  return bearerAuth({
    verifyToken: async (token, c) => {
      const format = await keyFormat(token);
      if (format === "invalid" || (format === "legacy" && !opts.acceptLegacyKeys)) return false;
      c.set("keyHash", await hashApiKey(token));
      c.set("keyHint", keyHint(token));
      return true;
    },
    // OpenAI answers 401 for a missing or malformed Authorization header alike.
    noAuthenticationHeader: { message: missing },
    invalidAuthenticationHeader: { message: missing },
    invalidToken: { message: (c) => errors.invalidApiKey(keyHint(presented(c))).getResponse() },
  });
}

/** Authenticates the request's key (401 if unknown or revoked) and returns it. */
export async function requireKey(c: Context<{ Variables: AuthVars }>, keyStore: KeyStore): Promise<KeyInfo> {
  const known = c.get("key");
  if (known) return known;
  const auth = await keyStore.authenticate(c.get("keyHash"));
  if (!auth.ok) {
    throw auth.reason === "revoked" ? errors.revokedApiKey(c.get("keyHint")) : errors.invalidApiKey(c.get("keyHint"));
  }
  c.set("key", auth.key);
  return auth.key;
}

/**
 * OpenAI answers 401 for a bad key before it looks at the body. Inference routes only authenticate when they
 * admit (one round trip for a valid request), so when a request fails earlier (malformed body, unknown model)
 * this middleware authenticates first, and a bad key turns that error into a 401.
 */
export function authBeforeErrors(opts: { keyStore: KeyStore }): MiddlewareHandler<{ Variables: AuthVars }> {
  return async function authBeforeErrorsMiddleware(c, next) {
    await next();
    if (c.error === undefined || c.get("key") !== undefined || c.res.status === 401 || c.res.status >= 500) return;
    try {
      await requireKey(c, opts.keyStore);
    } catch (e) {
      if (!(e instanceof HTTPException)) throw e;
      c.error = e;
      c.res = undefined; // replace, don't merge: the 401 must not carry the first error's headers
      c.res = e.getResponse();
    }
  };
}
