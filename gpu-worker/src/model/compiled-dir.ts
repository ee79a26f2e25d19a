/**
 * A compiled model directory: what `llama-worker compile --out DIR` writes, and what a worker serves without
 * compiling (mounted read-only from a shared volume, say):
 *
 *   weights.bin          the packed weights (compiled-model.ts)
 *   config.json, generation_config.json, tokenizer.json, tokenizer_config.json    copied from the checkpoint
 *   compiled.json        written last, so its presence means the rest is complete: the compiler version, the
 *                        source checkpoint and the model's name
 *
 * Also the clean-up of compile temp dirs (`*.tmp-<pid>-<time>`): a process's own when it is told to stop, and
 * other processes' once nobody has written to them for a while (a compile killed without a chance to clean up).
 *
 * @module
 */
import { createHash } from "node:crypto";
import {
  copyFileSync,
  existsSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { ModelLoadError } from "./errors.ts";
import { QUANTIZATIONS, type Quantization } from "./quantize.ts";

export const COMPILED_MANIFEST = "compiled.json";
const FORMAT = "llama-edge-compiled";
/** The checkpoint files a compiled directory carries besides the weights (the engine reads these). */
const CARRIED_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"];

export interface CompiledManifest {
  format: typeof FORMAT;
  /** compiled-model.ts' COMPILER_VERSION when written: another version's weights.bin has another layout. */
  compiler_version: number;
  /** The name clients use by default (the Hub repo id, or the checkpoint directory's name). */
  name: string;
  /** Where the checkpoint came from: `hf://org/name@<commit>`, or a directory with a fingerprint of its files. */
  source: string;
  /** The weights' format (quantize.ts): the packed layout depends on it. */
  quantization: Quantization;
  /** Bytes of weights.bin. */
  weights_bytes: number;
  created_at: string;
}

/** The manifest of a compiled directory; null when `dir` is a checkpoint (no compiled.json). */
export function readCompiledManifest(dir: string): CompiledManifest | null {
  const file = join(dir, COMPILED_MANIFEST);
  if (!existsSync(file)) return null;
  let m: CompiledManifest;
  try {
    m = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    throw new ModelLoadError(file, `unreadable: ${(e as Error).message}`);
  }
  if (m?.format !== FORMAT || typeof m.compiler_version !== "number" || typeof m.weights_bytes !== "number") {
    throw new ModelLoadError(file, `not a ${FORMAT} manifest`);
  }
  if (!QUANTIZATIONS.includes(m.quantization)) {
    throw new ModelLoadError(file, `unknown quantization ${JSON.stringify(m.quantization)}`);
  }
  return m;
}

/**
 * Checks a compiled directory against the compiler that will read it: same version, and a weights.bin of the size
 * the manifest promises (a copy cut short would otherwise fail deep inside ONNX Runtime).
 */
export function checkCompiledDir(
  dir: string,
  m: CompiledManifest,
  compilerVersion: number,
  quantization?: Quantization,
): void {
  const manifest = join(dir, COMPILED_MANIFEST);
  if (quantization !== undefined && quantization !== m.quantization) {
    throw new ModelLoadError(
      manifest,
      `compiled with quantization ${m.quantization}, not ${quantization}: compile again with --quantization ${quantization}`,
    );
  }
  if (m.compiler_version !== compilerVersion) {
    throw new ModelLoadError(
      manifest,
      `compiled by compiler version ${m.compiler_version}, this worker reads version ${compilerVersion}: run llama-worker compile again`,
    );
  }
  const weights = join(dir, "weights.bin");
  let size: number;
  try {
    size = statSync(weights).size;
  } catch {
    throw new ModelLoadError(weights, "missing from the compiled directory");
  }
  if (size !== m.weights_bytes) {
    throw new ModelLoadError(
      weights,
      `${size} bytes, but ${COMPILED_MANIFEST} says ${m.weights_bytes}: an incomplete copy?`,
    );
  }
}

/** A fingerprint of a checkpoint directory's files (names, sizes, modification times). */
export function checkpointFingerprint(dir: string): string {
  const h = createHash("sha256");
  for (const f of readdirSync(dir).sort()) {
    if (!/\.(json|safetensors)$/.test(f)) continue;
    const st = statSync(join(dir, f));
    h.update(`${f}:${st.size}:${st.mtimeMs}\n`);
  }
  return h.digest("hex").slice(0, 16);
}

/**
 * Completes a compiled directory around a weights.bin already packed in `staging`: moves it into `outDir`, copies
 * the checkpoint's config and tokenizer files, and writes the manifest last. A previous manifest is removed first,
 * so an interrupted replacement never passes for a complete directory.
 */
export function finishCompiledDir(
  checkpointDir: string,
  staging: string,
  outDir: string,
  m: Omit<CompiledManifest, "format" | "weights_bytes" | "created_at">,
): CompiledManifest {
  rmSync(join(outDir, COMPILED_MANIFEST), { force: true });
  renameSync(join(staging, "weights.bin"), join(outDir, "weights.bin"));
  for (const f of CARRIED_FILES) {
    if (existsSync(join(checkpointDir, f))) copyFileSync(join(checkpointDir, f), join(outDir, f));
    else rmSync(join(outDir, f), { force: true });
  }
  const manifest: CompiledManifest = {
    format: FORMAT,
    ...m,
    weights_bytes: statSync(join(outDir, "weights.bin")).size,
    created_at: new Date().toISOString(),
  };
  const tmp = join(outDir, `${COMPILED_MANIFEST}.tmp-${process.pid}`);
  writeFileSync(tmp, `${JSON.stringify(manifest, null, 2)}\n`);
  renameSync(tmp, join(outDir, COMPILED_MANIFEST));
  return manifest;
}

/** A compile temp dir or file: `<name>.tmp-<pid>-<time>` (compiled-model.ts) or `.compile.tmp-<pid>-<time>`. */
const TEMP = /\.tmp-(\d+)-\d+/;

/** Temp dirs nobody has written to for this long belong to a compile that was killed. */
export const STALE_TEMP_MS = 10 * 60_000;

/**
 * Removes compile temps in `dir`: those of process `pid` (it is stopping), or, without `pid`, those untouched for
 * STALE_TEMP_MS (their process was killed). Returns what was removed.
 */
export function removeCompileTemps(dir: string, opts: { pid?: number; now?: number } = {}): string[] {
  let entries: string[];
  try {
    entries = readdirSync(dir);
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const e of entries) {
    const m = TEMP.exec(e);
    if (!m) continue;
    const path = join(dir, e);
    const mine = opts.pid !== undefined && Number(m[1]) === opts.pid;
    if (!mine && (opts.pid !== undefined || (opts.now ?? Date.now()) - lastWrite(path) < STALE_TEMP_MS)) continue;
    try {
      rmSync(path, { recursive: true, force: true });
      removed.push(path);
    } catch {
      // removed concurrently
    }
  }
  return removed;
}

/** The newest modification time in a temp dir (the file being written), or of the file itself. */
function lastWrite(path: string): number {
  try {
    const st = statSync(path);
    if (!st.isDirectory()) return st.mtimeMs;
    return Math.max(st.mtimeMs, ...readdirSync(path).map((f) => lastWrite(join(path, f))));
  } catch {
    return Date.now();
  }
}
