/**
 * The compile step's thread: packs a checkpoint's weights into a staging directory. It runs off the main thread
 * because packing is one long synchronous loop, and the main thread must stay free to react to SIGTERM (remove the
 * temp files, then exit) instead of waiting minutes for the loop to end.
 *
 * @module
 */
import { parentPort, workerData } from "node:worker_threads";
import { compileModel } from "../model/compiled-model.ts";
import { loadLlamaConfig } from "../model/config.ts";
import type { Quantization } from "../model/quantize.ts";

export interface CompileThreadInit {
  checkpointDir: string;
  /** Where weights.bin goes (compileModel writes `<staging>.tmp-<pid>-<time>` first, then renames). */
  staging: string;
  quantization: Quantization;
}

export type CompileThreadMessage =
  | { type: "progress"; done: number; total: number }
  | { type: "done" }
  | { type: "failed"; name: string; message: string };

const port = parentPort;
if (!port) throw new Error("compile-thread.ts must run in a worker thread (see compile-command.ts)");
const { checkpointDir, staging, quantization } = workerData as CompileThreadInit;
const send = (m: CompileThreadMessage) => port.postMessage(m);
try {
  compileModel(checkpointDir, loadLlamaConfig(checkpointDir), {
    outDir: staging,
    quantization,
    onProgress: (done, total) => send({ type: "progress", done, total }),
  });
  send({ type: "done" });
} catch (e) {
  const err = e instanceof Error ? e : new Error(String(e));
  send({ type: "failed", name: err.name, message: err.message });
}
