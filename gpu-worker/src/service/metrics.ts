/**
 * The worker's Prometheus metrics (served on /metrics by health-server.ts). Engine gauges are read from the
 * latest engine stats at scrape time; request counters and latencies are recorded by the NATS worker.
 *
 * @module
 */
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
import type { EngineStats } from "../engine/types.ts";

export type RequestOutcome = "completed" | "aborted" | "rejected" | "failed";

export class WorkerMetrics {
  readonly registry = new Registry();
  readonly requests: Counter<"outcome">;
  readonly promptTokens: Counter;
  readonly cachedPromptTokens: Counter;
  readonly generationTokens: Counter;
  readonly queueSeconds: Histogram;
  readonly timeToFirstTokenSeconds: Histogram;
  readonly inFlight: Gauge;
  readonly natsConnected: Gauge;
  readonly draining: Gauge;

  constructor(labels: { pool: string; worker_id: string; model: string }, engineStats: () => EngineStats | null) {
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
      help: "Prompt tokens served from the prefix cache",
      registers,
    });
    this.generationTokens = new Counter({
      name: "llama_worker_generation_tokens_total",
      help: "Generated tokens",
      registers,
    });
    this.queueSeconds = new Histogram({
      name: "llama_worker_queue_seconds",
      help: "Time from submission by the gateway to admission by this worker",
      buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
      registers,
    });
    this.timeToFirstTokenSeconds = new Histogram({
      name: "llama_worker_time_to_first_token_seconds",
      help: "Time from admission to the first generated token",
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers,
    });
    this.inFlight = new Gauge({
      name: "llama_worker_requests_in_flight",
      help: "Requests admitted and not finished",
      registers,
    });
    this.natsConnected = new Gauge({ name: "llama_worker_nats_connected", help: "1 while connected", registers });
    this.draining = new Gauge({ name: "llama_worker_draining", help: "1 once shutting down", registers });

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
    engineGauge("llama_worker_engine_running", "Sequences running in the engine", (s) => s.running);
    engineGauge("llama_worker_engine_waiting", "Sequences waiting in the engine", (s) => s.waiting);
    engineGauge("llama_worker_engine_preemptions", "Preemptions since start", (s) => s.preempted);
    engineGauge("llama_worker_kv_blocks_total", "KV cache blocks", (s) => s.kvBlocksTotal);
    engineGauge("llama_worker_kv_blocks_free", "Free KV cache blocks", (s) => s.kvBlocksFree);
    engineGauge("llama_worker_kv_usage_ratio", "Used / total KV blocks", (s) =>
      s.kvBlocksTotal > 0 ? s.kvBlocksUsed / s.kvBlocksTotal : 0,
    );
    engineGauge("llama_worker_prefix_cache_hit_ratio", "Cached / looked-up prompt tokens", (s) => s.prefixCacheHitRate);
    engineGauge("llama_worker_generation_tokens_per_second", "Recent generation throughput", (s) => s.tokensPerSecond);
  }
}
