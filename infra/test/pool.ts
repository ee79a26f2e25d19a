/**
 * What one worker pool is made of in the manifests, gathered from a rendered overlay (or the worker base's own
 * files), and the checks that keep its parts consistent with each other, with the worker's command line and with
 * the dispatch protocol's names.
 *
 * @module
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { isValidPoolName, poolNames } from "@llama-edge/shared";
import { ensurePool } from "../../gpu-worker/src/service/pool-setup.ts";
import type { Manifest } from "./k8s.ts";
import { repoRoot } from "./k8s.ts";

/** The label every object of a pool carries (and the pool's selectors match on). */
export const POOL_LABEL = "llama-edge.dev/pool";

export interface Pool {
  deployment: Manifest;
  scaledObject: Manifest;
  pdb: Manifest;
  service: Manifest;
  /** The pool-setup Job (stream and consumer). */
  job: Manifest;
  /** The llama-compile Job, when this pool compiles its model (another pool may compile it for it). */
  compileJob?: Manifest;
  /** The llama-compile ConfigMap's data (LLAMA_MODEL, LLAMA_COMPILE_OUT, ...), with compileJob. */
  compile?: Record<string, string>;
  /** Environment of `llama-worker serve`, from the ConfigMap the Deployment's envFrom names. */
  env: Record<string, string>;
  /** The llama-pool-setup ConfigMap's data: stream.json, consumer.json, STREAM, CONSUMER, NATS_URL. */
  setup: Record<string, string>;
}

// biome-ignore lint/suspicious/noExplicitAny: container specs are read field by field in the checks below
export type Container = any;

export function workerContainer(pool: Pool): Container {
  const containers = pool.deployment.spec.template.spec.containers as Container[];
  const c = containers.find((x) => x.name === "worker");
  if (!c) throw new Error(`${pool.deployment.metadata.name}: no container named "worker"`);
  return c;
}

/** Splits rendered objects into pools: one per Deployment, with the objects that belong to it. */
export function poolsOf(objects: Manifest[]): Pool[] {
  const byKind = (kind: string) => objects.filter((o) => o.kind === kind);
  const configMaps = new Map(byKind("ConfigMap").map((c) => [c.metadata.name, c.data ?? {}]));
  return byKind("Deployment").map((deployment) => {
    const podLabels = deployment.spec.template.metadata.labels as Record<string, string>;
    const pool = podLabels[POOL_LABEL];
    const ofPool = (kind: string, component?: string) => {
      const found = byKind(kind).filter(
        (o) =>
          o.metadata.labels?.[POOL_LABEL] === pool &&
          (component === undefined || o.metadata.labels?.["app.kubernetes.io/component"] === component),
      );
      if (found.length > 1) throw new Error(`pool ${pool}: ${found.length} ${kind} objects, expected 1`);
      return found[0];
    };
    const required = (kind: string, component?: string) => {
      const found = ofPool(kind, component);
      if (!found) throw new Error(`pool ${pool}: no ${kind}${component ? ` (${component})` : ""}`);
      return found;
    };
    const container = (deployment.spec.template.spec.containers as Container[]).find((c) => c.name === "worker");
    const envFrom = (container?.envFrom ?? []) as { configMapRef?: { name: string } }[];
    const env: Record<string, string> = {};
    for (const ref of envFrom) {
      const cm = ref.configMapRef && configMaps.get(ref.configMapRef.name);
      if (!cm) throw new Error(`pool ${pool}: envFrom names ConfigMap ${ref.configMapRef?.name}, not rendered`);
      Object.assign(env, cm);
    }
    const job = required("Job", "pool-setup");
    const setupName = (job.spec.template.spec.volumes as { configMap?: { name: string } }[]).find((v) => v.configMap)
      ?.configMap?.name;
    const setup = setupName ? configMaps.get(setupName) : undefined;
    if (!setup) throw new Error(`pool ${pool}: the pool-setup Job's ConfigMap ${setupName} is not rendered`);
    const compileJob = ofPool("Job", "compile");
    const compileName = compileJob?.spec.template.spec.containers[0].envFrom?.[0]?.configMapRef?.name;
    return {
      deployment,
      scaledObject: required("ScaledObject"),
      pdb: required("PodDisruptionBudget"),
      service: required("Service"),
      job,
      compileJob,
      compile: compileName ? configMaps.get(compileName) : undefined,
      env,
      setup,
    };
  });
}

/** `selector` matches `labels` (matchLabels only: the manifests use no matchExpressions). */
export function selects(selector: Record<string, string>, labels: Record<string, string>): boolean {
  return Object.entries(selector).every(([k, v]) => labels[k] === v);
}

/** The environment variables `llama-worker serve` reads: the `env:` names of its OPTIONS table, and the ones it
 *  reads directly (`env.NATS_USER`: credentials have no flag). */
export function serveEnvVars(): Set<string> {
  const src = readFileSync(join(repoRoot, "gpu-worker/src/service/serve-command.ts"), "utf8");
  return new Set([...src.matchAll(/env:\s*"([A-Z0-9_]+)"|\benv\.([A-Z][A-Z0-9_]+)/g)].map((m) => m[1] ?? m[2]));
}

/** The stream and consumer configs the workers' pool-setup.ts creates for `pool` when they are absent. */
export async function workerPoolConfigs(
  pool: string,
): Promise<{ stream: Record<string, unknown>; consumer: Record<string, unknown> }> {
  const created: { stream?: Record<string, unknown>; consumer?: Record<string, unknown> } = {};
  const notFound = (name: string) => Object.assign(new Error(name), { name });
  const jsm = {
    streams: {
      info: async () => {
        if (!created.stream) throw notFound("StreamNotFoundError");
        return { config: created.stream };
      },
      add: async (cfg: Record<string, unknown>) => {
        created.stream = cfg;
        return { config: cfg };
      },
    },
    consumers: {
      info: async () => {
        if (!created.consumer) throw notFound("ConsumerNotFoundError");
        return { config: created.consumer };
      },
      add: async (_stream: string, cfg: Record<string, unknown>) => {
        created.consumer = cfg;
        return { config: cfg };
      },
    },
  };
  await ensurePool(jsm as never, pool);
  if (!created.stream || !created.consumer) throw new Error("ensurePool created nothing");
  return { stream: created.stream, consumer: created.consumer };
}

export function poolNameOf(pool: Pool): string {
  const name = pool.env.LLAMA_POOL;
  if (!name || !isValidPoolName(name)) throw new Error(`LLAMA_POOL ${JSON.stringify(name)} is not a valid pool name`);
  return name;
}

export { poolNames };
