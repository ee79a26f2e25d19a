/**
 * The gateway's HTTP app: OpenAI's API plus the admin API, built from injected dependencies so that tests run it
 * with `app.request()` and the Workers entry (index.ts) wires it to Durable Objects.
 *
 * @example
 * const app = createApp({ keyStore, limiter, dispatcher, config });
 * const res = await app.request("/v1/models", { headers: { authorization: `Bearer ${key}` } });
 *
 * @module
 */
import { Hono } from "hono";
import { cors } from "hono/cors";
import { HTTPException } from "hono/http-exception";
import type { GatewayConfig } from "./config.ts";
import type { JobRunner, Limiter } from "./dispatch/job.ts";
import { apiError, errors } from "./errors.ts";
import type { KeyStore } from "./keys/key-store.ts";
import { apiKeyAuth, authBeforeErrors } from "./middleware/auth.ts";
import { jsonBody } from "./middleware/json-body.ts";
import { adminRoutes } from "./routes/admin.ts";
import { chatCompletionsRoute } from "./routes/chat-completions.ts";
import { completionsRoute } from "./routes/completions.ts";
import { modelsRoute } from "./routes/models.ts";
import { usageRoute } from "./routes/usage.ts";

export interface AppDeps {
  keyStore: KeyStore;
  limiter: Limiter;
  /** Runs admitted jobs (a dispatch shard Durable Object in production). */
  dispatcher: JobRunner;
  config: GatewayConfig;
  /** Enables the admin API; without it every admin call is 401. */
  adminSecret?: string;
}

export function createApp(deps: AppDeps): Hono {
  const { keyStore, config } = deps;
  const app = new Hono();
  const body = jsonBody({ maxBytes: config.max_body_bytes });
  const inference = { limiter: deps.limiter, dispatcher: deps.dispatcher, config };

  // Browsers may call the API directly (as with OpenAI's); keys travel in the Authorization header, never cookies.
  app.use("/v1/*", cors({ origin: "*", allowHeaders: ["authorization", "content-type"], maxAge: 86_400 }));
  app.get("/health", (c) => c.json({ ok: true }));

  app.use("/v1/*", apiKeyAuth({ acceptLegacyKeys: config.accept_legacy_keys }));
  app.use("/v1/chat/completions", authBeforeErrors({ keyStore }), body);
  app.use("/v1/completions", authBeforeErrors({ keyStore }), body);
  app.route("/v1/chat/completions", chatCompletionsRoute(inference));
  app.route("/v1/completions", completionsRoute(inference));
  app.route("/v1/models", modelsRoute({ keyStore, config }));
  app.route("/v1/usage", usageRoute({ keyStore }));
  app.route("/admin", adminRoutes({ keyStore, adminSecret: deps.adminSecret }));

  app.notFound((c) => apiError(404, `Invalid URL (${c.req.method} ${new URL(c.req.url).pathname})`).getResponse());
  app.onError((err, c) => {
    if (err instanceof HTTPException) {
      const res = err.getResponse();
      // An HTTPException not built by errors.ts (e.g. from a Hono middleware): give it OpenAI's shape too.
      if (res.headers.get("content-type")?.includes("application/json")) return res;
      return apiError(res.status, err.message || res.statusText).getResponse();
    }
    console.error(`unhandled error on ${c.req.method} ${c.req.path}`, err);
    return errors.internal().getResponse();
  });
  return app;
}
