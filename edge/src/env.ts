/**
 * The Workers bindings and variables the gateway reads (wrangler.jsonc declares them).
 *
 * @module
 */
import type { DispatchShard } from "./durable/dispatch-shard.ts";
import type { KeyDirectory, KeyState } from "./durable/key-state.ts";

export interface Env {
  KEYS: DurableObjectNamespace<KeyState>;
  KEY_DIRECTORY: DurableObjectNamespace<KeyDirectory>;
  DISPATCH: DurableObjectNamespace<DispatchShard>;
  /** nats-server WebSocket listener, ws:// or wss://. */
  NATS_URL: string;
  /** Secrets, when the NATS WebSocket listener requires authentication. */
  NATS_TOKEN?: string;
  NATS_USER?: string;
  NATS_PASSWORD?: string;
  /** Secret: enables the admin API. */
  ADMIN_SECRET?: string;
  /** Number of dispatch shards (connection-holding Durable Objects). */
  DISPATCH_SHARDS?: string;
  /** Pools and models (see config.ts): a JSON object or a JSON string. */
  GATEWAY_CONFIG: unknown;
}
