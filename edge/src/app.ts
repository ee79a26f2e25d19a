/**
 * The gateway's HTTP app: OpenAI's API plus the admin API, built from injected dependencies so that tests run it
 * with `app.request()` and the Workers entry (index.ts) wires it to Durable Objects.
 *
 * @example
 * const app = createApp({ keyStore, limiter, dispatcher, config, requestCounters });
 * const res = await app.request("/v1/models", { headers: { authorization: `Bearer ${key}` } });
 *
 * @module
 */
import { Hono } from "hono";
import { HTTPException } from "hono/http-exception";
import { type RequestIdVariables, requestId } from "hono/request-id";
import type { GatewayConfig } from "./config.ts";
import type { JobRunner, Limiter } from "./dispatch/job.ts";
import { apiError, errors } from "./errors.ts";
import { randomBase62 } from "./keys/api-key.ts";
import type { KeyStore } from "./keys/key-store.ts";
import { countRequests, type RequestCounterStore } from "./metrics/request-counts.ts";
import { adminAuth } from "./middleware/admin-auth.ts";
import { apiKeyAuth, authBeforeErrors } from "./middleware/auth.ts";
import { apiCors } from "./middleware/cors.ts";
import { jsonBody } from "./middleware/json-body.ts";
import { adminRoutes } from "./routes/admin.ts";
import { chatCompletionsRoute } from "./routes/chat-completions.ts";
import { completionsRoute } from "./routes/completions.ts";
import { metricsRoute } from "./routes/metrics.ts";
import { modelsRoute } from "./routes/models.ts";
import { usageRoute } from "./routes/usage.ts";

export interface AppDeps {
  keyStore: KeyStore;
  limiter: Limiter;
  /** Runs admitted jobs (a dispatch shard Durable Object in production). */
  dispatcher: JobRunner;
  config: GatewayConfig;
  /** Where request counts go (Durable Objects in production): `GET /metrics` reads them back. */
  requestCounters: RequestCounterStore;
  /** Enables the admin API and /metrics; without it every admin call is 401. */
  adminSecret?: string;
}

/** The app's Hono environment: variables every route may read. */
export type AppEnv = { Variables: RequestIdVariables };

export function createApp(deps: AppDeps): Hono<AppEnv> {
  const { keyStore, config } = deps;
  const app = new Hono<AppEnv>();
  const body = jsonBody({ maxBytes: config.max_body_bytes });
  const inference = { limiter: deps.limiter, dispatcher: deps.dispatcher, config };

  // x-request-id on every answer, as OpenAI's. Always the gateway's own (never a client's): it names the job, and
  // the workers' request ids (in their logs) start with it.
  app.use(requestId({ headerName: "", generator: () => `req_${randomBase62(24)}` }));
  app.use(async function requestIdOnEveryAnswer(c, next) {
    await next();
    c.header("x-request-id", c.get("requestId")); // also on responses that replaced the one it was set on
  });
  app.use(countRequests(deps.requestCounters));
  app.use("/v1/*", apiCors({ origins: config.cors_origins }));
  app.get("/health", (c) => c.json({ ok: true }));

  app.use("/v1/*", apiKeyAuth({ acceptLegacyKeys: config.accept_legacy_keys }));
  app.use("/v1/chat/completions", authBeforeErrors({ keyStore }), body);
  app.use("/v1/completions", authBeforeErrors({ keyStore }), body);
  app.route("/v1/chat/completions", chatCompletionsRoute(inference));
  app.route("/v1/completions", completionsRoute(inference));
  app.route("/v1/models", modelsRoute({ keyStore, config }));
  app.route("/v1/usage", usageRoute({ keyStore }));
  const admin = adminAuth({ secret: deps.adminSecret });
  app.route("/admin", adminRoutes({ keyStore, auth: admin }));
  app.route("/metrics", metricsRoute({ keyStore, requests: deps.requestCounters, auth: admin }));

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
