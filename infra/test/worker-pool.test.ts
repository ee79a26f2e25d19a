import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseHubRef } from "../../gpu-worker/src/model/hub.ts";
import {
  hasKubectl,
  k8sDir,
  kustomize,
  loadManifests,
  type Manifest,
  manifestFiles,
  ofKind,
  rel,
  validateManifest,
} from "./k8s.ts";
import { natsValues } from "./nats-values.ts";
import {
  type Container,
  POOL_LABEL,
  type Pool,
  poolNameOf,
  poolNames,
  poolsOf,
  selects,
  serveEnvVars,
  workerContainer,
  workerPoolConfigs,
} from "./pool.ts";
import { bytes } from "./quantity.ts";
import { renderWorkerBase } from "./render-base.ts";

/** What `llama-worker compile --model` takes: an absolute directory or a Hub repo id. */
const parseHubRefOrPath = (m: string) => m.startsWith("/") || parseHubRef(m) !== null;

const kubectl = hasKubectl();
const PRODUCTION = join(k8sDir, "overlays/production");

/** Every directory of infra/k8s with a kustomization.yaml. */
function kustomizations(dir = k8sDir): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (!e.isDirectory()) continue;
    const sub = join(dir, e.name);
    if (readdirSync(sub).includes("kustomization.yaml")) out.push(sub);
    out.push(...kustomizations(sub));
  }
  return out.sort();
}

describe("manifest files", () => {
  it.each(manifestFiles().map((f) => [rel(f), f]))("%s parses and validates against its schema", (_name, file) => {
    const objects = loadManifests(file);
    expect(objects.length).toBeGreaterThan(0);
    for (const o of objects) expect(validateManifest(o), `${o.kind}/${o.metadata?.name}`).toEqual([]);
  });

  it("pool-setup configs are JSON", () => {
    for (const dir of [join(k8sDir, "worker"), join(PRODUCTION, "pools/long-context")]) {
      for (const f of ["stream.json", "consumer.json"])
        expect(() => JSON.parse(readFileSync(join(dir, f), "utf8"))).not.toThrow();
    }
  });
});

describe.skipIf(!kubectl)("kustomize builds (kubectl kustomize)", () => {
  it.each(kustomizations().map((d) => [rel(d), d]))("%s renders and every object validates", (_name, dir) => {
    const objects = kustomize(dir);
    expect(objects.length).toBeGreaterThan(0);
    for (const o of objects) expect(validateManifest(o), `${o.kind}/${o.metadata.name}`).toEqual([]);
  });

  it("the stand-in renderer used without kubectl agrees with kustomize on the worker base", () => {
    const strip = (objects: Manifest[]) =>
      objects
        .map((o) => JSON.parse(JSON.stringify(o).replace(/"(llama-worker)-[a-z0-9]{10}"/g, '"$1"')) as Manifest)
        .sort((a, b) => `${a.kind}/${a.metadata.name}`.localeCompare(`${b.kind}/${b.metadata.name}`));
    expect(strip(renderWorkerBase())).toEqual(strip(kustomize(join(k8sDir, "worker"))));
  });
});

/** The checks every pool must pass, whichever overlay it comes from. */
async function checkPool(pool: Pool): Promise<void> {
  const name = poolNameOf(pool);
  const names = poolNames(name);
  const d = pool.deployment;
  const where = `pool ${name}`;

  // Labels and selectors: everything of the pool carries its label, and selects exactly its pods.
  const podLabels = d.spec.template.metadata.labels as Record<string, string>;
  expect(podLabels[POOL_LABEL], where).toBe(name);
  expect(d.spec.selector.matchLabels[POOL_LABEL], `${where}: Deployment selector`).toBe(name);
  expect(selects(d.spec.selector.matchLabels, podLabels), `${where}: Deployment selector`).toBe(true);
  expect(pool.pdb.spec.selector.matchLabels, `${where}: PDB selects the Deployment's pods`).toEqual(
    d.spec.selector.matchLabels,
  );
  expect(pool.service.spec.selector, `${where}: metrics Service`).toEqual(d.spec.selector.matchLabels);
  for (const o of [pool.scaledObject, pool.pdb, pool.service, pool.job])
    expect(o.metadata.labels?.[POOL_LABEL]).toBe(name);
  expect(
    pool.pdb.spec.maxUnavailable ?? 0,
    `${where}: PDB must let a scaled-to-zero/one pool drain`,
  ).toBeGreaterThanOrEqual(1);

  // KEDA: the trigger reads this pool's stream and durable consumer, in the account the NATS values define.
  const so = pool.scaledObject.spec;
  expect(so.scaleTargetRef.name, `${where}: ScaledObject target`).toBe(d.metadata.name);
  expect(so.scaleTargetRef.kind ?? "Deployment").toBe("Deployment");
  expect(so.triggers).toHaveLength(1);
  const trigger = so.triggers[0];
  expect(trigger.type).toBe("nats-jetstream");
  const m = trigger.metadata as Record<string, string>;
  expect(m.stream, `${where}: trigger stream`).toBe(names.stream);
  expect(m.consumer, `${where}: trigger consumer`).toBe(names.consumer);
  const values = natsValues();
  expect(Object.keys(values.config.merge.accounts), `${where}: trigger account`).toContain(m.account);
  expect(m.natsServerMonitoringEndpoint, `${where}: KEDA must query the headless Service (per-server names)`).toBe(
    `nats-headless.nats.svc.cluster.local:${values.config.monitor.port}`,
  );
  expect(m.useHttps ?? "false").toBe(String(values.config.monitor.tls?.enabled ?? false));
  // lag = queued + running; one pod holds LLAMA_MAX_NUM_SEQS running (nats-worker.ts, NOTE on acknowledgement).
  expect(Number(m.lagThreshold), `${where}: lagThreshold = LLAMA_MAX_NUM_SEQS`).toBe(
    Number(pool.env.LLAMA_MAX_NUM_SEQS),
  );
  expect(Number.isInteger(Number(m.activationLagThreshold)) && Number(m.activationLagThreshold) >= 0).toBe(true);
  // KEDA leaves zero when the lag exceeds activationLagThreshold: at 0, the first request (lag 1) starts a worker.
  if (so.minReplicaCount === 0) expect(m.activationLagThreshold, `${where}: activation on a lag of 1`).toBe("0");
  expect(so.minReplicaCount).toBeGreaterThanOrEqual(0);
  expect(so.maxReplicaCount).toBeGreaterThanOrEqual(Math.max(1, so.minReplicaCount));
  expect(d.spec.replicas, `${where}: a Deployment replicas field fights KEDA on every apply`).toBeUndefined();
  // Rollouts never leave a pool that must always serve without a server: a new pod is up before an old one goes.
  const rolling = d.spec.strategy?.rollingUpdate ?? {};
  if (so.minReplicaCount >= 1) {
    expect(Number(rolling.maxSurge ?? 0), `${where}: maxSurge (min ${so.minReplicaCount})`).toBeGreaterThanOrEqual(1);
    expect(Number(rolling.maxUnavailable ?? 1), `${where}: maxUnavailable`).toBe(0);
  }

  // The worker container.
  const c = workerContainer(pool);
  expect(c.args?.[0]).toBe("serve");
  const res = c.resources;
  for (const r of ["cpu", "memory"]) expect(res?.requests?.[r], `${where}: requests.${r}`).toBeDefined();
  expect(res?.limits?.memory, `${where}: limits.memory`).toBeDefined();
  expect(Number(res?.limits?.["nvidia.com/gpu"]), `${where}: nvidia.com/gpu limit`).toBeGreaterThanOrEqual(1);
  expect(res.requests["nvidia.com/gpu"] ?? res.limits["nvidia.com/gpu"]).toBe(res.limits["nvidia.com/gpu"]);
  // The engine keeps its KV pool in host memory: the memory limit must hold it, with room for the process.
  if (pool.env.LLAMA_KV_CACHE_BYTES) {
    expect(bytes(res.limits.memory), `${where}: memory limit vs LLAMA_KV_CACHE_BYTES`).toBeGreaterThan(
      Number(pool.env.LLAMA_KV_CACHE_BYTES) + 8 * 1024 ** 3,
    );
  }
  const port = (ref: string | number) =>
    typeof ref === "number"
      ? ref
      : (c.ports as { name: string; containerPort: number }[]).find((p) => p.name === ref)?.containerPort;
  expect(c.readinessProbe?.httpGet?.path, `${where}: readiness probe`).toBe("/readyz");
  expect(c.livenessProbe?.httpGet?.path, `${where}: liveness probe`).toBe("/healthz");
  for (const probe of [c.readinessProbe, c.livenessProbe, c.startupProbe].filter(Boolean)) {
    expect(port(probe.httpGet.port), `${where}: probes on LLAMA_HEALTH_PORT`).toBe(Number(pool.env.LLAMA_HEALTH_PORT));
  }

  // Environment: every variable is one `llama-worker serve` reads, the pod's name is its worker id.
  const known = serveEnvVars();
  const envNames = [...Object.keys(pool.env), ...(c.env as { name: string }[]).map((e) => e.name)];
  // LLAMA_EDGE_CACHE_DIR is read by gpu-worker/src/model/default-model.ts (where compiled weights go).
  const notServeFlags = new Set(["LLAMA_EDGE_CACHE_DIR"]);
  for (const v of envNames)
    if (!notServeFlags.has(v)) expect(known, `${where}: ${v} is not read by llama-worker serve`).toContain(v);
  const workerId = (c.env as Container[]).find((e) => e.name === "LLAMA_WORKER_ID");
  expect(workerId?.valueFrom?.fieldRef?.fieldPath).toBe("metadata.name");
  for (const v of [
    "LLAMA_POOL",
    "LLAMA_MODEL",
    "NATS_URL",
    "LLAMA_MAX_NUM_SEQS",
    "LLAMA_HEALTH_PORT",
    "LLAMA_DEVICE",
  ]) {
    expect(pool.env[v], `${where}: ${v}`).toBeTruthy();
  }
  expect(pool.env.LLAMA_DEVICE).toBe("cuda");
  expect(pool.env.NATS_URL).toBe(`nats://nats.nats.svc.cluster.local:${values.config.nats?.port ?? 4222}`);

  // Volumes: the model directory is on a read-only mount; everything written (compiled weights, /tmp) is on one.
  const mounts = c.volumeMounts as { name: string; mountPath: string; readOnly?: boolean }[];
  const mountOf = (path: string) => mounts.find((mt) => path === mt.mountPath || path.startsWith(`${mt.mountPath}/`));
  expect(mountOf(pool.env.LLAMA_MODEL)?.readOnly, `${where}: LLAMA_MODEL on a read-only volume`).toBe(true);
  if (c.securityContext?.readOnlyRootFilesystem) {
    expect(mountOf(pool.env.LLAMA_EDGE_CACHE_DIR ?? "")?.readOnly ?? false, `${where}: cache dir writable`).toBe(false);
    expect(mountOf("/tmp"), `${where}: /tmp writable`).toBeDefined();
  }

  // The compiled model: the worker waits for it, and the pool's compile Job (if it has one) writes exactly it, on
  // the volume the worker reads, with the worker's own command.
  const init = (d.spec.template.spec.initContainers ?? []) as Container[];
  expect(JSON.stringify(init.map((x) => x.args)), `${where}: an init container waits for the model`).toContain(
    "$LLAMA_MODEL/compiled.json",
  );
  if (pool.compileJob) {
    const cj = pool.compileJob.spec.template.spec;
    const cc = cj.containers[0] as Container;
    expect(cc.args).toEqual(["compile"]);
    expect(pool.compile?.LLAMA_COMPILE_OUT, `${where}: the compile Job writes the worker's LLAMA_MODEL`).toBe(
      pool.env.LLAMA_MODEL,
    );
    const claimOf = (spec: Container, mountPath: string) => {
      const m = (spec.containers[0].volumeMounts as { name: string; mountPath: string; readOnly?: boolean }[]).find(
        (x) => mountPath === x.mountPath || mountPath.startsWith(`${x.mountPath}/`),
      );
      const v = (spec.volumes as Container[]).find((x) => x.name === m?.name);
      return { claim: v?.persistentVolumeClaim?.claimName, readOnly: m?.readOnly ?? false };
    };
    const written = claimOf(cj, pool.compile?.LLAMA_COMPILE_OUT ?? "");
    expect(written.readOnly, `${where}: the compile Job writes its output`).toBe(false);
    expect(written.claim).toBe(claimOf(d.spec.template.spec, pool.env.LLAMA_MODEL).claim);
    expect(claimOf(cj, pool.compile?.HF_HOME ?? "").claim, `${where}: HF_HOME on the shared volume`).toBe(
      written.claim,
    );
    for (const v of Object.keys(pool.compile ?? {}))
      expect(["LLAMA_MODEL", "LLAMA_COMPILE_OUT", "LLAMA_QUANTIZATION", "HF_HOME", "HF_ENDPOINT"]).toContain(v);
    expect(parseHubRefOrPath(pool.compile?.LLAMA_MODEL ?? ""), `${where}: compile LLAMA_MODEL`).toBe(true);
  }

  // Shutdown: SIGTERM drains for LLAMA_DRAIN_TIMEOUT; the grace period covers it (plus any preStop) with margin.
  const drainS = Number(pool.env.LLAMA_DRAIN_TIMEOUT);
  expect(drainS, `${where}: LLAMA_DRAIN_TIMEOUT`).toBeGreaterThan(0);
  const preStopS = Number(/sleep (\d+)/.exec(JSON.stringify(c.lifecycle?.preStop ?? ""))?.[1] ?? 0);
  expect(d.spec.template.spec.terminationGracePeriodSeconds, `${where}: grace period`).toBeGreaterThanOrEqual(
    preStopS + drainS + 10,
  );

  // The pool-setup Job creates the stream and consumer the workers would create, with replicas for the cluster.
  expect(pool.setup.STREAM).toBe(names.stream);
  expect(pool.setup.CONSUMER).toBe(names.consumer);
  expect(pool.setup.NATS_URL).toBe(pool.env.NATS_URL);
  const stream = JSON.parse(pool.setup["stream.json"]);
  const consumer = JSON.parse(pool.setup["consumer.json"]);
  const worker = await workerPoolConfigs(name);
  expect(stream).toMatchObject({ ...worker.stream, num_replicas: values.config.cluster.replicas });
  expect(consumer).toMatchObject(worker.consumer);
  expect(consumer.ack_wait / 1e9, `${where}: LLAMA_ACK_WAIT = consumer ack_wait`).toBe(Number(pool.env.LLAMA_ACK_WAIT));
  expect(consumer.filter_subject ?? names.requests).toBe(names.requests);
  const jobEnv = pool.job.spec.template.spec.containers[0].env as Container[];
  const secretOf = (env: Container[], n: string) => env.find((e) => e.name === n)?.valueFrom?.secretKeyRef?.name;
  expect(secretOf(jobEnv, "NATS_USER")).toBe("llama-nats-pool-admin");
  expect(secretOf(c.env, "NATS_USER")).toBe("llama-nats-worker");
  expect(secretOf(c.env, "NATS_PASSWORD")).toBe("llama-nats-worker");
}

describe("worker pool consistency", () => {
  it("the worker base is a complete pool (default) on its own", async () => {
    const objects = kubectl ? kustomize(join(k8sDir, "worker")) : renderWorkerBase();
    const pools = poolsOf(objects);
    expect(pools.map(poolNameOf)).toEqual(["default"]);
    await checkPool(pools[0]);
  });

  it.skipIf(!kubectl)(
    "the production overlay: every pool is consistent, and pools never select each other",
    async () => {
      const objects = kustomize(PRODUCTION);
      const pools = poolsOf(objects);
      expect(pools.map(poolNameOf).sort()).toEqual(["default", "long-context"]);
      for (const pool of pools) await checkPool(pool);

      // Names are unique per kind; every namespaced object is in llama-edge.
      const keys = objects.map((o) => `${o.kind}/${o.metadata.name}`);
      expect(new Set(keys).size).toBe(keys.length);
      for (const o of objects.filter((x) => x.kind !== "Namespace")) expect(o.metadata.namespace).toBe("llama-edge");
      // Each pool's PDB and Service select its own pods and no other pool's.
      for (const selector of [
        ...ofKind(objects, "PodDisruptionBudget").map((p) => p.spec.selector.matchLabels),
        ...ofKind(objects, "Service").map((s) => s.spec.selector),
      ]) {
        const matching = ofKind(objects, "Deployment").filter((d) =>
          selects(selector, d.spec.template.metadata.labels),
        );
        expect(matching).toHaveLength(1);
      }
      // Each pool's compiled model is written by some pool's compile Job.
      const compiled = new Set(pools.map((p) => p.compile?.LLAMA_COMPILE_OUT).filter(Boolean));
      for (const pool of pools)
        expect(compiled, `pool ${poolNameOf(pool)}: who compiles it`).toContain(pool.env.LLAMA_MODEL);
      // Volumes the pods claim exist in the same build.
      const claims = new Set(ofKind(objects, "PersistentVolumeClaim").map((p) => p.metadata.name));
      for (const d of ofKind(objects, "Deployment")) {
        for (const v of d.spec.template.spec.volumes as Container[]) {
          if (v.persistentVolumeClaim) expect(claims).toContain(v.persistentVolumeClaim.claimName);
        }
      }
    },
  );
});
