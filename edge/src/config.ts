/**
 * The gateway's configuration: which pools serve which models (and their context lengths) plus a few limits.
 * Comes from the `GATEWAY_CONFIG` variable (a JSON object in wrangler.jsonc, or a JSON string).
 *
 * @example
 * { "pools": { "small": { "max_context": 4096, "models": ["llama-3-8b"], "queue_timeout_ms": 60000 },
 *              "long":  { "max_context": 32768, "models": ["llama-3-8b"] } } }
 *
 * @module
 */
import { isValidPoolName } from "@llama-edge/shared";
import { z } from "zod";

export const GatewayConfigSchema = z.object({
  pools: z
    .record(
      z.string().refine(isValidPoolName, "pool names are [a-z0-9-]{1,64}"),
      z.object({
        /** Prompt + completion tokens a sequence may reach on this pool's workers. */
        max_context: z.number().int().min(1),
        models: z.array(z.string().min(1)).min(1),
        /** How long a request may wait in this pool's queue for a worker to start it (504 after). The default
         *  covers a cold start from zero (infra/README.md, "Cold starts"); a pool that never scales to zero can
         *  fail faster. */
        queue_timeout_ms: z.number().int().min(1000).default(600_000),
      }),
    )
    .refine((p) => Object.keys(p).length > 0, "at least one pool"),
  /** Completion tokens reserved against TPM when a request sets no max_tokens. */
  default_completion_reserve: z.number().int().min(1).default(256),
  /** Largest request body accepted (413 above). */
  max_body_bytes: z
    .number()
    .int()
    .min(1024)
    .default(1024 * 1024),
  /** How long a request may take beyond its queue wait: the gateway gives up (504) at admission + the longest
   *  `queue_timeout_ms` of its candidate pools + this. */
  request_timeout_ms: z.number().int().min(1000).default(120_000),
  /** A streaming client that reads nothing for this long while events wait for it is cancelled at the worker
   *  (its usage settled), and so is one that leaves more than `max_unread_bytes` of events unread. */
  idle_reader_timeout_ms: z.number().int().min(100).default(30_000),
  max_unread_bytes: z
    .number()
    .int()
    .min(64 * 1024)
    .default(1024 * 1024),
  /** A request's reservation lapses this long after its runner (a dispatch shard) last renewed it: should the
   *  runner die with its client, the key is charged what had been delivered and its slots come back by then. */
  reservation_lease_ms: z.number().int().min(1000).default(10_000),
  /** Name the serving worker(s) in an `x-llama-edge-worker` response header (development: worker ids are host
   *  names, not for the public). */
  expose_worker_id: z.boolean().default(false),
  /** Accept keys issued before keys carried a checksum (`sk-` + 48 characters): each such key, and each random
   *  string of that shape, costs a Durable Object lookup. Turn off once every old key has been replaced. */
  accept_legacy_keys: z.boolean().default(true),
  /** Origins whose pages may call the API from a browser (CORS): exact origins such as
   *  `https://app.example.com`, or `*` for any (keys are bearer tokens, never cookies). */
  cors_origins: z.array(z.union([z.literal("*"), z.url({ protocol: /^https?$/ })])).default(["*"]),
  /** `created` of every model in /v1/models (epoch seconds). */
  models_created: z.number().int().default(1_704_067_200),
});
export type GatewayConfig = z.infer<typeof GatewayConfigSchema>;

export interface PoolInfo {
  name: string;
  maxContext: number;
  queueTimeoutMs: number;
}

/** Parses `GATEWAY_CONFIG`; a broken config fails loudly at the first request rather than misrouting. */
export function parseGatewayConfig(raw: unknown): GatewayConfig {
  const value = typeof raw === "string" ? JSON.parse(raw) : raw;
  const parsed = GatewayConfigSchema.safeParse(value ?? {});
  if (!parsed.success) {
    throw new Error(`invalid GATEWAY_CONFIG: ${parsed.error.issues.map((i) => i.message).join("; ")}`);
  }
  return parsed.data;
}

/** Model names served, in config order. */
export function servedModels(config: GatewayConfig): string[] {
  return [...new Set(Object.values(config.pools).flatMap((p) => p.models))];
}

/** The pools serving `model`, smallest context first. */
export function poolsFor(config: GatewayConfig, model: string): PoolInfo[] {
  return Object.entries(config.pools)
    .filter(([, p]) => p.models.includes(model))
    .map(([name, p]) => ({ name, maxContext: p.max_context, queueTimeoutMs: p.queue_timeout_ms }))
    .sort((a, b) => a.maxContext - b.maxContext);
}
