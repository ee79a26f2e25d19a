/**
 * `llama-worker compile`: compile a checkpoint once into a directory that workers serve without compiling (see
 * model/compiled-dir.ts). In a cluster it runs as a Job writing to a ReadWriteMany volume, which the worker pods
 * mount read-only (infra/k8s/compile/).
 *
 * SIGTERM or SIGINT while compiling removes this process's temp files, then exits; temp files of a compile that was
 * killed outright are removed by the next run once nobody has written to them for a while.
 *
 * @module
 */
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { Worker } from "node:worker_threads";
import cliProgress from "cli-progress";
import {
  checkpointFingerprint,
  finishCompiledDir,
  readCompiledManifest,
  removeCompileTemps,
} from "../model/compiled-dir.ts";
import { COMPILER_VERSION } from "../model/compiled-model.ts";
import { formatBytes } from "../model/download-progress.ts";
import { ModelLoadError } from "../model/errors.ts";
import { resolveModel } from "../model/model-source.ts";
import { QUANTIZATIONS, type Quantization } from "../model/quantize.ts";
import type { CompileThreadInit, CompileThreadMessage } from "./compile-thread.ts";

export const COMPILE_USAGE = `Usage: llama-worker compile --model <dir|org/name[@revision]> --out <dir>
                            [--quantization none|int8|int4] [--force]

Compiles a checkpoint into <dir>: the packed weights (weights.bin), the config and tokenizer files, and
compiled.json, written last. Serve it with --model <dir> (a read-only mount will do): workers then skip compiling.
Running it again for the same checkpoint and compiler does nothing.

  --model <m>   LLAMA_MODEL        checkpoint directory, or a Hugging Face repo id (HF_ENDPOINT, HF_TOKEN, HF_HOME)
  --out <dir>   LLAMA_COMPILE_OUT  the compiled directory (created if absent)
  --quantization <q>  LLAMA_QUANTIZATION  weights: none (f32, exact; default), int8 or int4 (block-wise, every
                                     linear layer; the embedding in f16)
  --force                          compile even if <dir> already holds this checkpoint
`;

class UsageError extends Error {}

/** An error from the compile thread; `kind` is the thrown error's name (ModelLoadError: a bad checkpoint). */
class CompileFailed extends Error {
  constructor(
    readonly kind: string,
    message: string,
  ) {
    super(message);
  }
}

const say = (line: string) => process.stderr.write(`llama-worker compile: ${line}\n`);

/** Returns 0 when compiled (or already up to date), 1 on a load or compile failure, 2 on bad usage. */
export async function compileCommand(argv: string[]): Promise<number> {
  let model: string | undefined;
  let out: string | undefined;
  let force: boolean;
  let quantization: Quantization;
  try {
    const { values } = parseArgs({
      args: argv,
      options: {
        model: { type: "string" },
        out: { type: "string" },
        quantization: { type: "string" },
        force: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
    });
    if (values.help) {
      process.stdout.write(COMPILE_USAGE);
      return 0;
    }
    model = values.model ?? (process.env.LLAMA_MODEL || undefined);
    out = values.out ?? (process.env.LLAMA_COMPILE_OUT || undefined);
    force = values.force ?? false;
    if (!out) throw new UsageError("--out is required");
    const q = values.quantization ?? (process.env.LLAMA_QUANTIZATION || "none");
    if (!QUANTIZATIONS.includes(q as Quantization))
      throw new UsageError(`--quantization must be one of ${QUANTIZATIONS.join(", ")}, got "${q}"`);
    quantization = q as Quantization;
  } catch (e) {
    if (e instanceof UsageError || (e as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`llama-worker compile: ${(e as Error).message}\n\n${COMPILE_USAGE}`);
      return 2;
    }
    throw e;
  }

  const tty = process.stderr.isTTY === true;
  const started = performance.now();
  mkdirSync(out, { recursive: true });
  for (const p of removeCompileTemps(out)) say(`removed the leftover ${p}`);
  const source = await resolveModel(model, { tty, log: (line) => say(line) });
  if (source.kind === "compiled") throw new ModelLoadError(source.dir, "is compiled already: serve it as it is");
  const sourceId = source.kind === "hub" ? source.origin : `${source.dir}#${checkpointFingerprint(source.dir)}`;
  const existing = safeManifest(out);
  if (
    !force &&
    existing?.source === sourceId &&
    existing.compiler_version === COMPILER_VERSION &&
    existing.quantization === quantization
  ) {
    say(`${out} already holds ${source.name} (${sourceId}, ${quantization}), compiled by this version: nothing to do`);
    return 0;
  }

  const staging = join(out, `.compile.tmp-${process.pid}-${Date.now()}`);
  const onSignal = (sig: NodeJS.Signals) => {
    for (const p of removeCompileTemps(out, { pid: process.pid })) say(`${sig}: removed ${p}`);
    process.exit(sig === "SIGINT" ? 130 : 143);
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  const compileStarted = performance.now();
  try {
    say(`compiling ${source.name} from ${source.origin} into ${out} (quantization ${quantization})`);
    try {
      await runCompileThread({ checkpointDir: source.dir, staging, quantization }, tty);
    } catch (e) {
      if (!(e instanceof CompileFailed && e.kind === "ModelLoadError")) throw e;
      say(e.message); // "<file>: <what is wrong>", as the loader words it
      return 1;
    }
    const manifest = finishCompiledDir(source.dir, staging, out, {
      compiler_version: COMPILER_VERSION,
      quantization,
      name: source.name,
      source: sourceId,
    });
    const compileSeconds = (performance.now() - compileStarted) / 1000;
    say(
      `done: ${out} (weights.bin ${formatBytes(manifest.weights_bytes)}; download ${source.fetchSeconds.toFixed(1)} s, ` +
        `compile ${compileSeconds.toFixed(1)} s, total ${((performance.now() - started) / 1000).toFixed(1)} s)`,
    );
    return 0;
  } finally {
    process.off("SIGTERM", onSignal);
    process.off("SIGINT", onSignal);
    rmSync(staging, { recursive: true, force: true });
  }
}

function safeManifest(dir: string) {
  try {
    return readCompiledManifest(dir);
  } catch {
    return null; // unreadable: compiled over
  }
}

function runCompileThread(init: CompileThreadInit, tty: boolean): Promise<void> {
  const worker = new Worker(new URL("./compile-thread-entry.mjs", import.meta.url), { workerData: init });
  let bar: cliProgress.SingleBar | undefined;
  let lastLine = 0;
  return new Promise<void>((resolve, reject) => {
    worker.on("message", (m: CompileThreadMessage) => {
      if (m.type === "progress") {
        if (tty) {
          if (!bar) {
            bar = new cliProgress.SingleBar(
              { stream: process.stderr, format: "compiling [{bar}] {percentage}% | ETA {eta}s", clearOnComplete: true },
              cliProgress.Presets.shades_classic,
            );
            bar.start(m.total, 0);
          }
          bar.update(m.done);
        } else if (Date.now() - lastLine >= 10_000 || m.done === m.total) {
          lastLine = Date.now();
          say(`compiling: ${Math.floor((100 * m.done) / Math.max(1, m.total))} % of ${m.total} parameters`);
        }
      } else if (m.type === "done") resolve();
      else reject(new CompileFailed(m.name, m.message));
    });
    worker.once("error", reject);
    worker.once("exit", (code) => reject(new Error(`the compile thread exited with code ${code}`)));
  }).finally(() => {
    bar?.stop();
    void worker.terminate();
  });
}
