/**
 * The admin API, behind `Authorization: Bearer <ADMIN_SECRET>`:
 *
 *   POST   /admin/keys                {name?, limits?}  -> 201, the key's metadata plus `key` (shown this once)
 *   GET    /admin/keys                                  -> {object: "list", data: [metadata]}
 *   GET    /admin/keys/{id}                             -> metadata
 *   PATCH  /admin/keys/{id}           {name?, limits?}  -> metadata (limits merge: send only what changes)
 *   DELETE /admin/keys/{id}                             -> metadata with revoked_at (takes effect at once)
 *   GET    /admin/keys/{id}/usage?start_date&end_date   -> usage report
 *
 * Limits: {rpm, tpm, max_concurrent, budget: {tokens, period: "day"|"month"}, models: [...]}, null = unlimited.
 *
 * @module
 */
import { Hono, type MiddlewareHandler } from "hono";
import { errors } from "../errors.ts";
import type { KeyStore } from "../keys/key-store.ts";
import { CreateKeySchema, UpdateKeySchema } from "../keys/types.ts";
import { type JsonBodyVars, jsonBody } from "../middleware/json-body.ts";
import { parseRequest } from "../openai/schemas.ts";
import { usageRange } from "./usage.ts";

const ADMIN_BODY_LIMIT = 64 * 1024;

/** `auth`: the admin guard (middleware/admin-auth.ts), shared with /metrics. */
export function adminRoutes(deps: { keyStore: KeyStore; auth: MiddlewareHandler }) {
  const { keyStore } = deps;
  const body = jsonBody({ maxBytes: ADMIN_BODY_LIMIT });
  const notFound = (id: string) => errors.notFound(`No API key with id '${id}'.`);
  return new Hono<{ Variables: JsonBodyVars }>()
    .use(deps.auth)
    .post("/keys", body, async (c) => {
      const input = parseRequest(CreateKeySchema, c.get("body"));
      const { key, info } = await keyStore.create(input);
      return c.json({ ...info, key }, 201);
    })
    .get("/keys", async (c) => c.json({ object: "list", data: await keyStore.list() }))
    .get("/keys/:id", async (c) => {
      const info = await keyStore.get(c.req.param("id"));
      if (!info) throw notFound(c.req.param("id"));
      return c.json(info);
    })
    .patch("/keys/:id", body, async (c) => {
      const patch = parseRequest(UpdateKeySchema, c.get("body"));
      const info = await keyStore.update(c.req.param("id"), patch);
      if (!info) throw notFound(c.req.param("id"));
      return c.json(info);
    })
    .delete("/keys/:id", async (c) => {
      const info = await keyStore.revoke(c.req.param("id"));
      if (!info) throw notFound(c.req.param("id"));
      return c.json(info);
    })
    .get("/keys/:id/usage", async (c) => {
      const { start, end } = usageRange(c);
      const report = await keyStore.usage({ id: c.req.param("id") }, start, end);
      if (!report) throw notFound(c.req.param("id"));
      return c.json(report);
    });
}
