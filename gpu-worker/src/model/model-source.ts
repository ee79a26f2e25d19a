/**
 * What `--model` names, resolved to a directory the engine loads. One place for `serve`, `generate`, `compile` and
 * `npm start`:
 *   (nothing)              the generated default model (random weights)
 *   a directory            a Hugging Face checkpoint, or a compiled directory (`llama-worker compile --out`)
 *   org/name[@revision]    a model on the Hugging Face Hub, downloaded into its cache (hub.ts)
 * A directory wins over a repo id that reads the same, as in transformers.
 *
 * @module
 */
import { statSync } from "node:fs";
import { basename, resolve } from "node:path";
import { readCompiledManifest } from "./compiled-dir.ts";
import { ensureDefaultModel } from "./default-model.ts";
import {
  type DownloadProgressReporter,
  downloadProgressReporter,
  type ProgressLogFields,
} from "./download-progress.ts";
import { ModelLoadError } from "./errors.ts";
import { type DownloadOptions, downloadModel, parseHubRef } from "./hub.ts";

export interface ModelSource {
  /** The directory to load. */
  dir: string;
  /** The name clients use unless told otherwise: the repo id for a Hub model, else the directory's name. */
  name: string;
  kind: "default" | "checkpoint" | "compiled" | "hub";
  /** Seconds spent fetching the model (downloading, or generating the default one); 0 when it was there. */
  fetchSeconds: number;
  /** For a Hub model: `hf://org/name@<commit>`; else the directory. */
  origin: string;
}

export interface ResolveModelOptions {
  /** Progress of a download: a bar when `tty`, else a line every few seconds through `log`. */
  log?: (message: string, fields?: Partial<ProgressLogFields>) => void;
  tty?: boolean;
  /** Overrides for the Hub client (tests: endpoint, retry delays). The environment supplies the rest. */
  hub?: DownloadOptions;
}

export async function resolveModel(spec: string | undefined, opts: ResolveModelOptions = {}): Promise<ModelSource> {
  const log = opts.log ?? (() => {});
  const started = performance.now();
  const seconds = () => (performance.now() - started) / 1000;
  if (spec === undefined || spec === "") {
    const dir = await ensureDefaultModel("default", { quiet: !opts.tty });
    return { dir, name: basename(dir), kind: "default", fetchSeconds: seconds(), origin: dir };
  }

  let isDir: boolean | undefined;
  try {
    isDir = statSync(spec).isDirectory();
  } catch {
    // not a path here
  }
  if (isDir === false) throw new ModelLoadError(spec, "not a directory: expected a checkpoint directory or org/name");
  if (isDir) {
    const dir = resolve(spec);
    const compiled = readCompiledManifest(dir);
    if (compiled) return { dir, name: compiled.name, kind: "compiled", fetchSeconds: 0, origin: compiled.source };
    return { dir, name: basename(dir), kind: "checkpoint", fetchSeconds: 0, origin: dir };
  }

  const ref = parseHubRef(spec);
  if (!ref) {
    const pathLike = /^[/.~]/.test(spec) || spec.split("/").length > 2;
    throw new ModelLoadError(
      spec,
      pathLike ? "no such directory" : "no such directory, and not a Hugging Face repo id (org/name[@revision])",
    );
  }
  const progress: DownloadProgressReporter = downloadProgressReporter({ tty: opts.tty ?? false, log });
  try {
    const m = await downloadModel(ref, {
      onProgress: (p) => progress.update(p),
      onWarning: (w) => log(w),
      ...opts.hub,
    });
    return {
      dir: m.dir,
      name: ref.repo,
      kind: "hub",
      fetchSeconds: seconds(),
      origin: `hf://${ref.repo}@${m.commit}`,
    };
  } finally {
    progress.done();
  }
}
