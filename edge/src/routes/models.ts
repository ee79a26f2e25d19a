/**
 * `GET /v1/models` and `GET /v1/models/{model}`: the models the gateway routes, limited to those the key may use.
 *
 * @module
 */
import { Hono } from "hono";
import { type GatewayConfig, servedModels } from "../config.ts";
import { errors } from "../errors.ts";
import type { KeyStore } from "../keys/key-store.ts";
import { type AuthVars, requireKey } from "../middleware/auth.ts";

export function modelsRoute(deps: { keyStore: KeyStore; config: GatewayConfig }) {
  const { config } = deps;
  const model = (id: string) => ({ id, object: "model", created: config.models_created, owned_by: "llama-edge" });
  return (
    new Hono<{ Variables: AuthVars }>()
      .get("/", async (c) => {
        const key = await requireKey(c, deps.keyStore);
        const ids = servedModels(config).filter((m) => !key.limits.models || key.limits.models.includes(m));
        return c.json({ object: "list", data: ids.map(model) });
      })
      // Model names may contain slashes ("meta-llama/Llama-2-7b-chat-hf").
      .get("/:model{.+}", async (c) => {
        const key = await requireKey(c, deps.keyStore);
        const id = c.req.param("model");
        const allowed = !key.limits.models || key.limits.models.includes(id);
        if (!allowed || !servedModels(config).includes(id)) throw errors.modelNotFound(id);
        return c.json(model(id));
      })
  );
}
