/**
 * A local stand-in for KEDA on one machine: keeps between min and max `llama-worker serve` processes for a pool
 * and sizes it from the same signal and the same settings as the cluster's ScaledObject
 * (infra/k8s/worker/scaledobject.yaml): the pool consumer's lag (NumPending + NumAckPending, i.e. requests queued
 * plus requests running), a lag threshold per worker, and the HPA behaviour (scale-up rate, scale-down
 * stabilisation window and rate). Scale-down sends SIGTERM, so a worker drains its streams before it exits,
 * exactly as a pod does.
 *
 * @module
 */
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { poolNames } from "@llama-edge/shared";
import { jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import { parse } from "yaml";
import { ensurePool } from "../../gpu-worker/src/service/pool-setup.ts";

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const SCALED_OBJECT_FILE = join(repoRoot, "infra", "k8s", "worker", "scaledobject.yaml");

export interface ScalePolicy {
  minReplicas: number;
  maxReplicas: number;
  /** Lag one worker is expected to absorb (its max_num_seqs). */
  lagThreshold: number;
  /** At or below this lag a pool with minReplicas 0 stays at zero. */
  activationLagThreshold: number;
  pollingIntervalMs: number;
  /** Most workers added per scaleUpPeriodMs. */
  scaleUpPods: number;
  scaleUpPeriodMs: number;
  /** Scale down only to the highest size wanted over this window (HPA stabilisation). */
  scaleDownWindowMs: number;
  /** Most workers removed per scaleDownPeriodMs. */
  scaleDownPods: number;
  scaleDownPeriodMs: number;
}

interface HpaPolicy {
  stabilizationWindowSeconds?: number;
  policies?: { type: string; value: number; periodSeconds: number }[];
}

/** The ScaledObject's settings as a policy; `overrides` lets a local run compress time or cap the size. */
export function readScalePolicy(file = SCALED_OBJECT_FILE, overrides: Partial<ScalePolicy> = {}): ScalePolicy {
  const so = parse(readFileSync(file, "utf8")) as {
    spec: {
      pollingInterval?: number;
      minReplicaCount?: number;
      maxReplicaCount?: number;
      advanced?: { horizontalPodAutoscalerConfig?: { behavior?: { scaleUp?: HpaPolicy; scaleDown?: HpaPolicy } } };
      triggers: { type: string; metadata: Record<string, string> }[];
    };
  };
  const trigger = so.spec.triggers.find((t) => t.type === "nats-jetstream");
  if (!trigger) throw new Error(`${file}: no nats-jetstream trigger`);
  const behavior = so.spec.advanced?.horizontalPodAutoscalerConfig?.behavior ?? {};
  const up = behavior.scaleUp?.policies?.[0];
  const down = behavior.scaleDown?.policies?.[0];
  return {
    minReplicas: so.spec.minReplicaCount ?? 0,
    maxReplicas: so.spec.maxReplicaCount ?? 100,
    lagThreshold: Number(trigger.metadata.lagThreshold ?? 10),
    activationLagThreshold: Number(trigger.metadata.activationLagThreshold ?? 0),
    pollingIntervalMs: (so.spec.pollingInterval ?? 30) * 1000,
    scaleUpPods: up?.value ?? 4,
    scaleUpPeriodMs: (up?.periodSeconds ?? 15) * 1000,
    scaleDownWindowMs: (behavior.scaleDown?.stabilizationWindowSeconds ?? 300) * 1000,
    scaleDownPods: down?.value ?? 1,
    scaleDownPeriodMs: (down?.periodSeconds ?? 15) * 1000,
    ...overrides,
  };
}

/** What KEDA's HPA asks for at this lag: ceil(lag / threshold) within [min, max], zero only below activation. */
export function desiredReplicas(lag: number, p: ScalePolicy): number {
  if (lag <= p.activationLagThreshold && p.minReplicas === 0) return 0;
  return Math.min(p.maxReplicas, Math.max(p.minReplicas, 1, Math.ceil(lag / p.lagThreshold)));
}

export interface AutoscalerEvent {
  type: "scale-up" | "scale-down" | "poll" | "worker-exit";
  replicas: number;
  lag: number;
  workerId?: string;
  code?: number | null;
}

export interface AutoscalerOptions {
  pool: string;
  nc: NatsConnection;
  policy: ScalePolicy;
  /** Starts one worker; it must run `llama-worker serve` for `pool` (SIGTERM drains it). */
  startWorker: (workerId: string) => ChildProcess;
  onEvent?: (e: AutoscalerEvent) => void;
}

/** The worker command line the local stack uses. */
export function spawnWorker(args: {
  workerId: string;
  pool: string;
  natsUrl: string;
  model?: string;
  maxNumSeqs: number;
  extra?: string[];
}): ChildProcess {
  const argv = [
    join(repoRoot, "gpu-worker", "bin", "llama-worker.js"),
    "serve",
    "--pool",
    args.pool,
    "--nats",
    args.natsUrl,
    "--worker-id",
    args.workerId,
    "--max-num-seqs",
    String(args.maxNumSeqs),
    "--health-port",
    "0",
    ...(args.model ? ["--model", args.model] : []),
    ...(args.extra ?? []),
  ];
  // Own process group: a terminal's Ctrl-C reaches only the supervisor, which drains workers with one SIGTERM
  // (a second signal would make a worker exit without draining).
  return spawn(process.execPath, argv, { stdio: ["ignore", "inherit", "inherit"], detached: true });
}

export class LocalAutoscaler {
  readonly workers = new Map<string, ChildProcess>();
  private readonly draining = new Set<string>();
  private timer: NodeJS.Timeout | null = null;
  private nextId = 0;
  /** (time, desired) over the scale-down window. */
  private history: { t: number; desired: number }[] = [];
  private lastUp = 0;
  private lastDown = 0;
  private upInPeriod = 0;
  private stopped = false;

  constructor(private readonly o: AutoscalerOptions) {}

  /** Active (not draining) workers. */
  get replicas(): number {
    return this.workers.size - this.draining.size;
  }

  async start(): Promise<void> {
    // Like the cluster's pool-setup Job: the stream and consumer exist before any worker, so requests can queue
    // (and build the lag that starts a worker) even at zero workers.
    await ensurePool(await jetstreamManager(this.o.nc), this.o.pool);
    for (let i = 0; i < Math.max(this.o.policy.minReplicas, 0); i++) this.add(0);
    this.timer = setInterval(() => {
      this.poll().catch(() => {
        // NATS briefly unreachable: KEDA holds its size too; try again next interval.
      });
    }, this.o.policy.pollingIntervalMs);
  }

  /** The pool consumer's lag as KEDA's nats-jetstream scaler reads it. */
  async lag(): Promise<number> {
    const names = poolNames(this.o.pool);
    const jsm = await jetstreamManager(this.o.nc);
    try {
      const info = await jsm.consumers.info(names.stream, names.consumer);
      return info.num_pending + info.num_ack_pending;
    } catch {
      return 0; // no stream yet: nothing queued
    }
  }

  async poll(now = Date.now()): Promise<void> {
    if (this.stopped) return;
    const p = this.o.policy;
    const lag = await this.lag();
    const desired = desiredReplicas(lag, p);
    this.history.push({ t: now, desired });
    this.history = this.history.filter((h) => now - h.t <= p.scaleDownWindowMs);
    this.o.onEvent?.({ type: "poll", replicas: this.replicas, lag });
    if (desired > this.replicas) {
      if (now - this.lastUp >= p.scaleUpPeriodMs) {
        this.lastUp = now;
        this.upInPeriod = 0;
      }
      const n = Math.min(desired - this.replicas, p.scaleUpPods - this.upInPeriod);
      for (let i = 0; i < n; i++) this.add(lag);
      this.upInPeriod += Math.max(0, n);
      return;
    }
    // Scale down only to the highest size wanted over the whole stabilisation window.
    const stable = Math.max(...this.history.map((h) => h.desired));
    const windowCovered =
      this.history.length > 0 && now - this.history[0].t >= p.scaleDownWindowMs - p.pollingIntervalMs;
    if (stable < this.replicas && windowCovered && now - this.lastDown >= p.scaleDownPeriodMs) {
      this.lastDown = now;
      for (let i = 0; i < Math.min(p.scaleDownPods, this.replicas - stable); i++) this.remove(lag);
    }
  }

  private add(lag: number): void {
    const id = `${this.o.pool}-local-${this.nextId++}`;
    const proc = this.o.startWorker(id);
    this.workers.set(id, proc);
    proc.on("exit", (code) => {
      this.workers.delete(id);
      this.draining.delete(id);
      this.o.onEvent?.({ type: "worker-exit", replicas: this.replicas, lag: 0, workerId: id, code });
    });
    this.o.onEvent?.({ type: "scale-up", replicas: this.replicas, lag, workerId: id });
  }

  /** Drain the newest worker (SIGTERM): it stops pulling and finishes its streams, then exits. */
  private remove(lag: number): void {
    const id = [...this.workers.keys()].reverse().find((w) => !this.draining.has(w));
    if (!id) return;
    this.draining.add(id);
    this.workers.get(id)?.kill("SIGTERM");
    this.o.onEvent?.({ type: "scale-down", replicas: this.replicas, lag, workerId: id });
  }

  /** Drain every worker and wait for them to exit. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    const exits = [...this.workers.values()].map(
      (p) => new Promise<void>((resolve) => (p.exitCode !== null ? resolve() : p.once("exit", () => resolve()))),
    );
    for (const p of this.workers.values()) p.kill("SIGTERM");
    await Promise.all(exits);
  }
}
