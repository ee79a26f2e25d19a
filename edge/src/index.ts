/**
 * The Workers entry: builds the app from the environment (Durable Objects, secrets, config) once per isolate and
 * exports the Durable Object classes wrangler.jsonc binds.
 *
 * @module
 */
import type { Hono } from "hono";
import { type AppEnv, createApp } from "./app.ts";
import { parseGatewayConfig } from "./config.ts";
import { ShardedJobRunner } from "./durable/dispatch-shard.ts";
import { DurableKeyStore } from "./durable/durable-key-store.ts";
import { DurableRequestCounters } from "./durable/request-counters.ts";
import type { Env } from "./env.ts";

export { DispatchShard } from "./durable/dispatch-shard.ts";
export { KeyDirectory, KeyState } from "./durable/key-state.ts";
export { RequestCounters } from "./durable/request-counters.ts";

let cached: { env: Env; app: Hono<AppEnv> } | undefined;

/** The app for `env`; rebuilt only if the environment object changes (a new deployment or test setup). */
export function appFor(env: Env): Hono<AppEnv> {
  if (cached?.env === env) return cached.app;
  const keys = new DurableKeyStore(env.KEYS, env.KEY_DIRECTORY);
  const shards = Number(env.DISPATCH_SHARDS ?? "4");
  const app = createApp({
    keyStore: keys,
    limiter: keys,
    dispatcher: new ShardedJobRunner(env.DISPATCH, Number.isInteger(shards) && shards > 0 ? shards : 4, keys),
    config: parseGatewayConfig(env.GATEWAY_CONFIG),
    requestCounters: new DurableRequestCounters(env.REQUEST_COUNTERS),
    adminSecret: env.ADMIN_SECRET || undefined,
  });
  cached = { env, app };
  return app;
}

export default {
  fetch(request, env, ctx) {
    return appFor(env).fetch(request, env, ctx);
  },
} satisfies ExportedHandler<Env>;
