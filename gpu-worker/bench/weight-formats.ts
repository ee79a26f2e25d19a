/**
 * Weight formats (issue 9): decode speed of f32, int8 and int4 weights on the bench model, their next-token
 * quality against f32, and (with --big) a llama2-7b-shaped model in int4/int8: speed against the memory-bandwidth
 * roofline, peak memory and compile time.
 *
 * @module
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { LLMEngine } from "../src/engine/llm-engine.ts";
import { cacheDir, ensureDefaultModel } from "../src/model/default-model.ts";
import type { Quantization } from "../src/model/quantize.ts";
import { PUBLISHED_SHAPES, writeRandomLlama } from "../src/model/random-model.ts";
import { ParamsProgress } from "../src/random-model-command.ts";
import { allLogits, compare } from "../test/quantized-quality.ts";
import { decodeThroughput, log, quick, record, threads } from "./harness.ts";

const FORMATS: Quantization[] = ["none", "int8", "int4"];
/** llama.cpp `llama-bench tg128` on this machine kind, 2 threads, same random bench-shape weights (issue 9). */
const LLAMA_CPP_TPS: Record<Quantization, [string, number]> = {
  none: ["F32", 96],
  int8: ["Q8_0", 177],
  int4: ["Q4_0", 206],
};
/** What llama.cpp reaches here: 96 tok/s × 438 MB per token (issue 9); our own probe reads less. */
const ROOFLINE_BANDWIDTH = 42e9;

export async function weightFormatTable(): Promise<void> {
  const dir = await ensureDefaultModel("bench", { quiet: true });
  log("\n## Weight formats, bench model (decode tokens/s)");
  log("| weights | 1 stream | 32 streams | llama.cpp, 1 stream (issue 9's figure, same machine kind) |");
  log("|---|---:|---:|---:|");
  for (const q of FORMATS) {
    const engine = await LLMEngine.create({ modelDir: dir, maxNumSeqs: 32, quantization: q, numThreads: threads });
    await decodeThroughput(engine, 2, 4);
    const one = await decodeThroughput(engine, 1, quick ? 24 : 64);
    const many = await decodeThroughput(engine, 32, quick ? 16 : 48);
    const [name, ref] = LLAMA_CPP_TPS[q];
    log(`| ${q === "none" ? "f32" : q} | ${one.toFixed(1)} | ${many.toFixed(1)} | ${name} ${ref} |`);
    record(`format_${q}_tps_1`, one, 1);
    record(`format_${q}_tps_32`, many, 1);
  }
}

export async function qualityRows(): Promise<void> {
  const dir = await ensureDefaultModel("default", { quiet: true });
  const f32 = await allLogits(dir, "none", threads);
  log("\n## Quantized vs f32 next-token distributions (default model, 1024 teacher-forced positions)");
  log("| weights | top-1 agreement | mean KL (nats) |\n|---|---:|---:|");
  for (const q of ["int8", "int4"] as const) {
    const m = compare(f32, await allLogits(dir, q, threads));
    log(`| ${q} | ${(m.top1 * 100).toFixed(1)} % | ${m.kl.toFixed(4)} |`);
    record(`quality_${q}_top1_pct`, m.top1 * 100, 1);
    record(`quality_${q}_kl`, m.kl, 4);
  }
}

/** The llama2-7b-shaped bf16 checkpoint, generated into the cache once (about 13 GB). */
function llama2_7b(): string {
  const dir = join(cacheDir(), "models", "llama2-7b-random-bf16");
  if (!existsSync(join(dir, "config.json"))) {
    log(`generating ${dir} (one time, ~13 GB)…`);
    const progress = new ParamsProgress("random-model llama2-7b bf16");
    writeRandomLlama(
      dir,
      { config: PUBLISHED_SHAPES["llama2-7b"], seed: 1, dtype: "BF16", shards: 4, tokenizer: "llama2" },
      (done, total) => progress.update(done, total),
    );
    progress.stop();
  }
  return dir;
}

interface BigRun {
  compileS: number;
  loadS: number;
  tps: number;
  peakRssBytes: number;
  decodeBytesPerToken: number;
}

export async function bigModelRows(): Promise<void> {
  const dir = llama2_7b();
  log("\n## llama2-7b shape (random bf16 checkpoint), single stream, 2 GiB KV pool");
  log(
    "| weights | compile s | load s | tokens/s | weights read/token | roofline at 42 GB/s | % of roofline | peak RSS |",
  );
  log("|---|---:|---:|---:|---:|---:|---:|---:|");
  const child = fileURLToPath(new URL("./big-model-child.ts", import.meta.url));
  for (const q of ["int4", "int8"] as const) {
    // A process of its own, so its peak RSS is the model's alone.
    const r = spawnSync(process.execPath, ["--import", "tsx", child, dir, q, String(threads), quick ? "16" : "48"], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "inherit"],
    });
    if (r.status !== 0) throw new Error(`big-model-child ${q} failed (${r.status})`);
    const m = JSON.parse(r.stdout.trim().split("\n").pop() ?? "{}") as BigRun;
    const roof = ROOFLINE_BANDWIDTH / m.decodeBytesPerToken;
    log(
      `| ${q} | ${m.compileS.toFixed(0)} | ${m.loadS.toFixed(1)} | ${m.tps.toFixed(2)} | ${(m.decodeBytesPerToken / 1e9).toFixed(2)} GB | ${roof.toFixed(2)} tok/s | ${((m.tps / roof) * 100).toFixed(0)} % | ${(m.peakRssBytes / 2 ** 30).toFixed(2)} GiB |`,
    );
    record(`llama2_7b_${q}_tps`, m.tps, 2);
    record(`llama2_7b_${q}_roofline_pct`, (m.tps / roof) * 100, 1);
    record(`llama2_7b_${q}_peak_rss_gib`, m.peakRssBytes / 2 ** 30, 2);
    record(`llama2_7b_${q}_compile_s`, m.compileS, 0);
  }
}
