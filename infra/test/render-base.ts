/**
 * A small stand-in for `kubectl kustomize infra/k8s/worker`, for machines without kubectl: it implements only what
 * the worker base uses (resources, labels with selectors and templates, configMapGenerator without hash suffixes).
 * worker-pool.test.ts checks that it agrees with the real kustomize wherever kubectl is installed.
 *
 * @module
 */
import { readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { k8sDir, literals, loadManifests, type Manifest, parseYaml } from "./k8s.ts";

interface Kustomization {
  resources?: string[];
  labels?: { pairs: Record<string, string>; includeSelectors?: boolean; includeTemplates?: boolean }[];
  configMapGenerator?: { name: string; literals?: string[]; files?: string[] }[];
}

export function renderWorkerBase(): Manifest[] {
  const dir = join(k8sDir, "worker");
  const k = parseYaml(readFileSync(join(dir, "kustomization.yaml"), "utf8"))[0] as Kustomization;
  const objects: Manifest[] = (k.resources ?? []).flatMap((r) => loadManifests(join(dir, r)));
  for (const gen of k.configMapGenerator ?? []) {
    const data = literals(gen.literals);
    for (const f of gen.files ?? []) data[basename(f)] = readFileSync(join(dir, f), "utf8");
    objects.push({ apiVersion: "v1", kind: "ConfigMap", metadata: { name: gen.name }, data });
  }
  for (const { pairs, includeSelectors, includeTemplates } of k.labels ?? []) {
    for (const o of objects) {
      o.metadata.labels = { ...o.metadata.labels, ...pairs };
      const spec = o.spec;
      if (!spec) continue;
      if (includeSelectors) {
        if (spec.selector?.matchLabels) Object.assign(spec.selector.matchLabels, pairs);
        else if (o.kind === "Service" && spec.selector) Object.assign(spec.selector, pairs);
      }
      if (includeSelectors) {
        // kustomize also adds selector labels to the pod (anti-)affinity terms' label selectors.
        const affinity = spec.template?.spec?.affinity ?? {};
        for (const kind of ["podAffinity", "podAntiAffinity"]) {
          for (const t of affinity[kind]?.preferredDuringSchedulingIgnoredDuringExecution ?? []) {
            if (t.podAffinityTerm?.labelSelector?.matchLabels)
              Object.assign(t.podAffinityTerm.labelSelector.matchLabels, pairs);
          }
          for (const t of affinity[kind]?.requiredDuringSchedulingIgnoredDuringExecution ?? []) {
            if (t.labelSelector?.matchLabels) Object.assign(t.labelSelector.matchLabels, pairs);
          }
        }
      }
      if ((includeSelectors || includeTemplates) && spec.template?.metadata) {
        spec.template.metadata.labels = { ...spec.template.metadata.labels, ...pairs };
      }
    }
  }
  return objects;
}
