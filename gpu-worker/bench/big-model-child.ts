/**
 * One big-model measurement in a process of its own (see weight-formats.ts): compile (timed, progress on
 * stderr), load with a 2 GiB KV pool, decode one stream; prints one JSON line with the figures and the process's
 * peak RSS. Usage: node --import tsx big-model-child.ts DIR int4|int8 THREADS TOKENS
 */
import { readFileSync } from "node:fs";
import { LLMEngine } from "../src/engine/llm-engine.ts";
import { compileModel } from "../src/model/compiled-model.ts";
import { loadLlamaConfig } from "../src/model/config.ts";
import { parseQuantization } from "../src/model/quantize.ts";
import { ParamsProgress } from "../src/random-model-command.ts";
import { decodeThroughput } from "./harness.ts";

const [dir, q, threads, tokens] = process.argv.slice(2);
const quantization = parseQuantization(q);
const progress = new ParamsProgress(`compile ${q}`);
const t0 = performance.now();
const compiled = compileModel(dir, loadLlamaConfig(dir), {
  quantization,
  onProgress: (done, total) => progress.update(done, total),
});
progress.stop();
const compileS = (performance.now() - t0) / 1000;
const t1 = performance.now();
const engine = await LLMEngine.create({
  modelDir: dir,
  quantization,
  numThreads: Number(threads),
  maxNumSeqs: 1,
  kvCacheBytes: 2 * 1024 ** 3,
});
const loadS = (performance.now() - t1) / 1000;
await decodeThroughput(engine, 1, 4);
const tps = await decodeThroughput(engine, 1, Number(tokens));
const hwm = /VmHWM:\s+(\d+) kB/.exec(readFileSync("/proc/self/status", "utf8"));
const peakRssBytes = hwm ? Number(hwm[1]) * 1024 : 0;
process.stdout.write(
  `${JSON.stringify({ compileS, loadS, tps, peakRssBytes, decodeBytesPerToken: compiled.decodeBytesPerToken })}\n`,
);
process.exit(0);
