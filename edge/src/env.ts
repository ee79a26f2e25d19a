/**
 * The Workers bindings and variables the gateway reads (wrangler.jsonc declares them).
 *
 * @module
 */
import type { DispatchShard, DispatchShardEnv } from "./durable/dispatch-shard.ts";
import type { RequestCounters } from "./durable/request-counters.ts";

export interface Env extends DispatchShardEnv {
  DISPATCH: DurableObjectNamespace<DispatchShard>;
  /** Request counts for /metrics (see durable/request-counters.ts). */
  REQUEST_COUNTERS: DurableObjectNamespace<RequestCounters>;
  /** Secret: enables the admin API and /metrics. */
  ADMIN_SECRET?: string;
  /** Number of dispatch shards (connection-holding Durable Objects). */
  DISPATCH_SHARDS?: string;
  /** Pools and models (see config.ts): a JSON object or a JSON string. */
  GATEWAY_CONFIG: unknown;
}
