/**
 * The worker's Prometheus metrics (served on /metrics by health-server.ts). Names follow Prometheus conventions
 * (base units, `_total` only on counters) and carry vLLM's meaning where vLLM has the same metric: TTFT and
 * inter-token latency histograms, requests running and waiting, KV-cache usage, preemptions, prompt and
 * generation tokens. Engine gauges are read from the latest engine stats at scrape time, the pool's lag from
 * JetStream (cached briefly); request counters and latencies are recorded by the NATS worker.
 *
 * infra/k8s/monitoring (the dashboard and the alerts) queries these names, and a test checks each one exists.
 *
 * @module
 */
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
import type { EngineStats } from "../engine/types.ts";

export type RequestOutcome = "completed" | "aborted" | "rejected" | "failed";

/** Steps of a cold start, in order; their sum is the time from process start to serving. */
export type ColdStartPhase = "init" | "download" | "compile" | "load" | "connect";

/** The pool consumer's counts as KEDA reads them. */
export interface PoolLag {
  /** Requests in the stream no worker has pulled (JetStream num_pending). */
  pending: number;
  /** Requests pulled and not yet acked: running (num_ack_pending). */
  ackPending: number;
}

const LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export class WorkerMetrics {
  readonly registry = new Registry();
  readonly requests: Counter<"outcome">;
  readonly promptTokens: Counter;
  readonly cachedPromptTokens: Counter;
  readonly generationTokens: Counter;
  readonly queueTimeSeconds: Histogram;
  readonly timeToFirstTokenSeconds: Histogram;
  readonly interTokenLatencySeconds: Histogram;
  readonly e2eRequestLatencySeconds: Histogram;
  readonly inFlight: Gauge;
  readonly natsConnected: Gauge;
  readonly draining: Gauge;
  readonly coldStartSeconds: Gauge<"phase">;

  constructor(
    labels: { pool: string; worker_id: string; model: string },
    engineStats: () => EngineStats | null,
    poolLag?: () => Promise<PoolLag | null>,
  ) {
    const registers = [this.registry];
    this.registry.setDefaultLabels(labels);
    collectDefaultMetrics({ register: this.registry });
    this.requests = new Counter({
      name: "llama_worker_requests_total",
      help: "Requests finished by this worker, by outcome (rejected = refused before admission)",
      labelNames: ["outcome"],
      registers,
    });
    this.promptTokens = new Counter({ name: "llama_worker_prompt_tokens_total", help: "Prompt tokens", registers });
    this.cachedPromptTokens = new Counter({
      name: "llama_worker_cached_prompt_tokens_total",
      help: "Prompt tokens served from the prefix cache (vLLM's prefix cache hits, in tokens)",
      registers,
    });
    this.generationTokens = new Counter({
      name: "llama_worker_generation_tokens_total",
      help: "Generated tokens",
      registers,
    });
    this.queueTimeSeconds = new Histogram({
      name: "llama_worker_request_queue_time_seconds",
      help: "Time from submission by the gateway to admission by a worker (the pool's queue, a cold start included)",
      buckets: [...LATENCY_BUCKETS, 120, 300, 600],
      registers,
    });
    this.timeToFirstTokenSeconds = new Histogram({
      name: "llama_worker_time_to_first_token_seconds",
      help: "Time from admission to the first generated token",
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.interTokenLatencySeconds = new Histogram({
      name: "llama_worker_inter_token_latency_seconds",
      help: "Time between consecutive generated tokens of a request",
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5],
      registers,
    });
    this.e2eRequestLatencySeconds = new Histogram({
      name: "llama_worker_e2e_request_latency_seconds",
      help: "Time from admission to the last event of a request",
      buckets: [...LATENCY_BUCKETS, 120, 300, 600],
      registers,
    });
    this.inFlight = new Gauge({
      name: "llama_worker_requests_in_flight",
      help: "Requests admitted and not finished",
      registers,
    });
    this.natsConnected = new Gauge({ name: "llama_worker_nats_connected", help: "1 while connected", registers });
    this.draining = new Gauge({ name: "llama_worker_draining", help: "1 once shutting down", registers });
    this.coldStartSeconds = new Gauge({
      name: "llama_worker_cold_start_seconds",
      help: "This worker's start, by phase: init (process), download (the model), compile (pack the weights), load (into ONNX Runtime), connect (NATS)",
      labelNames: ["phase"],
      registers,
    });

    const engineGauge = (name: string, help: string, pick: (s: EngineStats) => number) =>
      new Gauge({
        name,
        help,
        registers,
        collect() {
          const s = engineStats();
          if (s) this.set(pick(s));
        },
      });
    engineGauge("llama_worker_num_requests_running", "Requests in the engine's running batch", (s) => s.running);
    engineGauge("llama_worker_num_requests_waiting", "Requests admitted and waiting for the engine", (s) => s.waiting);
    engineGauge("llama_worker_kv_cache_blocks", "KV cache blocks", (s) => s.kvBlocksTotal);
    engineGauge("llama_worker_kv_cache_free_blocks", "Free KV cache blocks", (s) => s.kvBlocksFree);
    engineGauge("llama_worker_kv_cache_usage_ratio", "Used / total KV cache blocks (1 = full)", (s) =>
      s.kvBlocksTotal > 0 ? s.kvBlocksUsed / s.kvBlocksTotal : 0,
    );
    engineGauge("llama_worker_prefix_cache_hit_ratio", "Cached / looked-up prompt tokens", (s) => s.prefixCacheHitRate);
    engineGauge("llama_worker_generation_tokens_per_second", "Recent generation throughput", (s) => s.tokensPerSecond);
    let preemptions = 0;
    new Counter({
      name: "llama_worker_preemptions_total",
      help: "Requests preempted for KV cache space (recomputed later)",
      registers,
      collect() {
        const s = engineStats();
        if (s && s.preempted > preemptions) {
          this.inc(s.preempted - preemptions);
          preemptions = s.preempted;
        }
      },
    });

    if (poolLag) {
      const lag = cached(poolLag, 2000);
      new Gauge({
        name: "llama_worker_pool_lag",
        help: "The pool consumer's lag as KEDA reads it: requests queued + running, pool-wide (same on every worker)",
        registers,
        async collect() {
          const l = await lag();
          if (l) this.set(l.pending + l.ackPending);
        },
      });
      new Gauge({
        name: "llama_worker_pool_pending",
        help: "Requests queued in the pool that no worker has pulled yet, pool-wide",
        registers,
        async collect() {
          const l = await lag();
          if (l) this.set(l.pending);
        },
      });
    }
  }
}

/** One call per `ttlMs` at most, however many gauges (and scrapes) ask; a failed call answers null. */
function cached<T>(fn: () => Promise<T | null>, ttlMs: number): () => Promise<T | null> {
  let at = 0;
  let value: Promise<T | null> = Promise.resolve(null);
  return () => {
    if (Date.now() - at >= ttlMs) {
      at = Date.now();
      value = fn().catch(() => null);
    }
    return value;
  };
}
