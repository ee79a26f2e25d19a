/**
 * Loading and validating the Kubernetes manifests of infra/k8s offline: YAML parsing, kustomize rendering (through
 * `kubectl kustomize` when kubectl is installed), and schema validation with the typed models of
 * `kubernetes-models` and `@kubernetes-models/keda`.
 *
 * The models' validators check types, enums and required fields but ignore unknown fields, so a misspelled field
 * (`livenesProbe`) would pass. `validateManifest` therefore also runs the same validator over a proxy that records
 * which fields it reads: a field the schema never looked at is one the API server would reject or drop.
 *
 * @module
 */
import { spawnSync } from "node:child_process";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import {
  PodMonitor,
  PrometheusRule,
  ServiceMonitor,
} from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { ScrapeConfig } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1alpha1";
import { Deployment } from "kubernetes-models/apps/v1";
import { Job } from "kubernetes-models/batch/v1";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1";
import { ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service } from "kubernetes-models/v1";
import { parseAllDocuments } from "yaml";

export const infraDir = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const repoRoot = resolve(infraDir, "..");
export const k8sDir = join(infraDir, "k8s");

/** A Kubernetes object as parsed from YAML. */
export interface Manifest {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; [k: string]: unknown };
  // biome-ignore lint/suspicious/noExplicitAny: manifests are walked generically; each test narrows what it reads
  spec?: any;
  data?: Record<string, string>;
  [k: string]: unknown;
}

interface ModelClass {
  new (data: never): { validate(): void };
  prototype: { validate(): void };
}

/** The kinds infra/k8s may contain; a new kind must be added here, with its typed model, to be validated. */
const MODELS: Record<string, ModelClass> = {
  "v1/Namespace": Namespace as unknown as ModelClass,
  "v1/ConfigMap": ConfigMap as unknown as ModelClass,
  "v1/Secret": Secret as unknown as ModelClass,
  "v1/Service": Service as unknown as ModelClass,
  "v1/PersistentVolumeClaim": PersistentVolumeClaim as unknown as ModelClass,
  "apps/v1/Deployment": Deployment as unknown as ModelClass,
  "batch/v1/Job": Job as unknown as ModelClass,
  "policy/v1/PodDisruptionBudget": PodDisruptionBudget as unknown as ModelClass,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject as unknown as ModelClass,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor as unknown as ModelClass,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor as unknown as ModelClass,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule as unknown as ModelClass,
  "monitoring.coreos.com/v1alpha1/ScrapeConfig": ScrapeConfig as unknown as ModelClass,
};

/** Files under infra/k8s that are not Kubernetes objects. */
const NOT_MANIFESTS = new Set(["kustomization.yaml", "kustomizeconfig.yaml", "values.yaml"]);

/** Every YAML file of infra/k8s that holds Kubernetes objects (kustomizations and Helm values excluded). */
export function manifestFiles(dir = k8sDir): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...manifestFiles(path));
    else if (/\.ya?ml$/.test(name) && !NOT_MANIFESTS.has(name) && !isPatch(path)) out.push(path);
  }
  return out;
}

/** Strategic-merge patches are partial objects: they are validated as part of the rendered overlay instead. */
function isPatch(path: string): boolean {
  const kustomization = join(dirname(path), "kustomization.yaml");
  try {
    const k = parseYaml(readFileSync(kustomization, "utf8"))[0] as { patches?: { path?: string }[] };
    return (k.patches ?? []).some((p) => p.path !== undefined && resolve(dirname(path), p.path) === path);
  } catch {
    return false;
  }
}

/** Parses every document of a YAML stream; throws on the first syntax error. */
export function parseYaml(text: string): unknown[] {
  return parseAllDocuments(text)
    .map((doc) => {
      if (doc.errors.length > 0) throw doc.errors[0];
      return doc.toJS();
    })
    .filter((d) => d !== null && d !== undefined);
}

export function loadManifests(path: string): Manifest[] {
  return parseYaml(readFileSync(path, "utf8")) as Manifest[];
}

export const rel = (path: string): string => relative(repoRoot, path);

let kubectlChecked: boolean | undefined;
/** True when `kubectl kustomize` can run here (kubectl carries kustomize since 1.14). */
export function hasKubectl(): boolean {
  kubectlChecked ??= spawnSync("kubectl", ["version", "--client"], { encoding: "utf8", timeout: 20_000 }).status === 0;
  return kubectlChecked;
}

/** Renders a kustomization directory with `kubectl kustomize`, exactly what `kubectl apply -k` would send. */
export function kustomize(dir: string): Manifest[] {
  const r = spawnSync("kubectl", ["kustomize", dir], { encoding: "utf8", timeout: 60_000 });
  if (r.status !== 0) throw new Error(`kubectl kustomize ${rel(dir)} failed:\n${r.stderr}`);
  return parseYaml(r.stdout) as Manifest[];
}

/**
 * Validates one object against its Kubernetes/KEDA schema. Returns the problems found (empty when valid): schema
 * violations from the typed model, and fields the schema does not know.
 */
export function validateManifest(obj: Manifest): string[] {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const Model = MODELS[key];
  if (!Model) return [`no schema for ${key}: add its model to infra/test/k8s.ts`];
  const problems: string[] = [];
  try {
    new Model(structuredClone(obj) as never).validate();
  } catch (e) {
    problems.push((e as Error).message);
  }
  const read = new Set<string>();
  const data = structuredClone(obj) as unknown as Record<string, unknown>;
  try {
    Model.prototype.validate.call(track(data, "", read));
  } catch {
    // reported above
  }
  for (const path of allPaths(data, "")) {
    if (!read.has(path) && !isFreeForm(path)) problems.push(`unknown field ${path}`);
  }
  return problems;
}

/** Fields whose contents the schemas leave open (maps and opaque objects), by path suffix. */
function isFreeForm(path: string): boolean {
  return /^\/(apiVersion|kind)$/.test(path);
}

/** A proxy over `value` that adds the path of every property read to `read`. */
function track(value: unknown, path: string, read: Set<string>): unknown {
  if (typeof value !== "object" || value === null) return value;
  return new Proxy(value as object, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver);
      if (typeof prop !== "string" || !Object.hasOwn(target, prop)) return v;
      const p = `${path}/${prop}`;
      read.add(p);
      return track(v, p, read);
    },
  });
}

/** The paths of every own property, recursively (array elements included). */
function allPaths(value: unknown, path: string): string[] {
  if (typeof value !== "object" || value === null) return [];
  const out: string[] = [];
  for (const [k, v] of Object.entries(value)) {
    const p = `${path}/${k}`;
    out.push(p, ...allPaths(v, p));
  }
  return out;
}

/** The objects of `kind` among `manifests`. */
export const ofKind = (manifests: Manifest[], kind: string): Manifest[] => manifests.filter((m) => m.kind === kind);

/** `key=value` literals of a kustomize configMapGenerator entry, as a record. */
export function literals(entries: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const e of entries ?? []) {
    const i = e.indexOf("=");
    out[e.slice(0, i)] = e.slice(i + 1);
  }
  return out;
}
