/**
 * `npm run bench:engine [-- --quick] [-- --json] [-- --device cpu|cuda|webgpu] [-- --only <section>]`: offline engine
 * benchmarks on the generated models (sections: throughput, weights, quality, ttft, sampling, structured, mixed, pool,
 * kv, prefix, bandwidth, big).
 * Prints a table; with --json the last line is one JSON object holding every figure (names in the README).
 * Ratios are measured within one run, since absolute numbers move with whatever else the machine does.
 */

import { existsSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";
import onnxPkg from "onnx-proto";
import * as ort from "onnxruntime-node";
import { LLMEngine } from "../src/engine/llm-engine.ts";
import { kvBytesPerToken } from "../src/engine/model-backend.ts";
import type { SamplingParams } from "../src/engine/types.ts";
import type { WebGpuRunner } from "../src/engine/webgpu-runner.ts";
import { loadLlamaConfig } from "../src/model/config.ts";
import { cacheDir, ensureDefaultModel } from "../src/model/default-model.ts";
import { writeRandomLlama } from "../src/model/random-model.ts";
import { LlamaWeights } from "../src/model/weights.ts";

import {
  backend,
  big,
  decode,
  decodeThroughput,
  device,
  json,
  log,
  only,
  percentile,
  promptOf,
  quick,
  record,
  results,
  threads,
} from "./harness.ts";
import { structuredOutput } from "./structured-output.ts";
import { bigModelRows, qualityRows, weightFormatTable } from "./weight-formats.ts";

async function throughputTable(shape: "default" | "bench", sizes: number[], tokens: number) {
  const dir = await ensureDefaultModel(shape, { quiet: true });
  const engine = await LLMEngine.create({ ...backend, modelDir: dir, maxNumSeqs: Math.max(...sizes) });
  await decodeThroughput(engine, 2, 4); // warm-up
  const base = await decodeThroughput(engine, 1, tokens);
  log(`\n## Decode throughput, ${shape} model (${tokens} tokens per stream)`);
  log("| streams | tokens/s | × one stream |\n|---:|---:|---:|");
  for (const n of sizes) {
    const tps = n === 1 ? base : await decodeThroughput(engine, n, tokens);
    record(`${shape}_decode_tps_${n}`, tps, 1);
    record(`${shape}_decode_speedup_${n}`, tps / base);
    log(`| ${n} | ${tps.toFixed(1)} | ${(tps / base).toFixed(2)} |`);
  }
}

/** What sampling costs on top of greedy decoding: 32 streams on the default model (where it weighs most). */
async function samplingCost() {
  const dir = await ensureDefaultModel("default", { quiet: true });
  const engine = await LLMEngine.create({ ...backend, modelDir: dir, maxNumSeqs: 32 });
  await decodeThroughput(engine, 4, 4);
  const tokens = quick ? 24 : 64;
  const modes: [string, string, Partial<SamplingParams>][] = [
    ["greedy", "greedy", {}],
    ["temperature 0.8", "temperature", { temperature: 0.8, seed: 1 }],
    ["temperature 0.8, top_p 0.95", "top_p", { temperature: 0.8, topP: 0.95, seed: 1 }],
    ["temperature 0.8, top_k 50", "top_k", { temperature: 0.8, topK: 50, seed: 1 }],
  ];
  log(`\n## Sampling cost (default model, 32 streams, ${tokens} tokens each)`);
  log("| sampling | tokens/s | vs greedy |\n|---|---:|---:|");
  let greedy = 0;
  for (const [label, key, params] of modes) {
    const tps = await decodeThroughput(engine, 32, tokens, params);
    if (key === "greedy") greedy = tps;
    record(`sampling_tps_${key}`, tps, 1);
    log(`| ${label} | ${tps.toFixed(1)} | ${(tps / greedy).toFixed(2)} |`);
  }
}

/**
 * Mixed workload: streams decoding while long prompts keep arriving. Chunked prefill bounds each step's work by
 * the token budget, so the decoding streams' inter-token latency stays low; a budget as large as the prompt
 * prefills it in one step and stalls them for that step. Bench model, 8 streams, prompts of 768 tokens.
 */
async function mixedWorkload() {
  const dir = await ensureDefaultModel("bench", { quiet: true });
  log("\n## Mixed workload (bench model): 8 decoding streams, a 768-token prompt arriving every 250 ms");
  log("| max_num_batched_tokens | inter-token p50 | inter-token p99 | new prompts' TTFT p50 |\n|---:|---:|---:|---:|");
  for (const budget of [256, 1024]) {
    const engine = await LLMEngine.create({
      ...backend,
      modelDir: dir,
      maxNumSeqs: 16,
      maxNumBatchedTokens: budget,
      enablePrefixCaching: false,
    });
    await decodeThroughput(engine, 2, 4);
    const gaps: number[] = [];
    const ttfts: number[] = [];
    let streaming = true;
    const streams = Array.from({ length: 8 }, async (_, i) => {
      let last = 0;
      for await (const e of engine.submit({
        requestId: `mx-${budget}-${i}`,
        prompt: promptOf(8, i),
        sampling: decode(quick ? 60 : 120),
      })) {
        if (e.type !== "delta") continue;
        const now = performance.now();
        if (last > 0) gaps.push(now - last);
        last = now;
      }
      streaming = false;
    });
    const arrivals: Promise<void>[] = [];
    for (let k = 0; streaming && k < (quick ? 3 : 6); k++) {
      await new Promise((r) => setTimeout(r, 250));
      const t0 = performance.now();
      arrivals.push(
        (async () => {
          for await (const e of engine.submit({
            requestId: `mx-${budget}-long-${k}`,
            prompt: promptOf(768, 100 + k),
            sampling: decode(1),
          })) {
            if (e.type === "delta") ttfts.push(performance.now() - t0);
          }
        })(),
      );
    }
    await Promise.all([...streams, ...arrivals]);
    const [p50, p99, t50] = [percentile(gaps, 0.5), percentile(gaps, 0.99), percentile(ttfts, 0.5)];
    log(`| ${budget} | ${p50.toFixed(1)} ms | ${p99.toFixed(1)} ms | ${t50.toFixed(0)} ms |`);
    record(`mixed_itl_p50_ms_budget_${budget}`, p50);
    record(`mixed_itl_p99_ms_budget_${budget}`, p99);
    record(`mixed_ttft_p50_ms_budget_${budget}`, t50, 1);
  }
}

/**
 * Time to first token while 32 clients each send one request after another (closed loop, 64-token completions,
 * 128-token prompts, bench model), against its bound: one decode step at 32 streams plus one prefill chunk.
 */
async function ttftUnderLoad() {
  const dir = await ensureDefaultModel("bench", { quiet: true });
  const engine = await LLMEngine.create({ ...backend, modelDir: dir, maxNumSeqs: 32 });
  await decodeThroughput(engine, 4, 4);
  const stepMs = 1000 / ((await decodeThroughput(engine, 32, quick ? 16 : 32)) / 32);
  const chunkTimes: number[] = [];
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    for await (const e of engine.submit({
      requestId: `chunk-${i}`,
      prompt: promptOf(128, 500 + i),
      sampling: decode(1),
    })) {
      if (e.type === "delta") chunkTimes.push(performance.now() - t0);
    }
  }
  const chunkMs = percentile(chunkTimes, 0.5);
  const ttfts: number[] = [];
  const perClient = quick ? 3 : 5;
  // Steady state, not a burst: client c starts c/32 of a completion's duration after the first, so arrivals are
  // spread as in a served pool (32 clients started at once would keep arriving as one wave of 32 prompts, 4096
  // prefill tokens, every 64 steps). Each client's first request only sets up that spread and is not counted.
  const spacingMs = (64 * stepMs) / 32;
  await Promise.all(
    Array.from({ length: 32 }, async (_, c) => {
      await new Promise((r) => setTimeout(r, c * spacingMs));
      for (let k = 0; k < perClient; k++) {
        const t0 = performance.now();
        let first = true;
        for await (const e of engine.submit({
          requestId: `cl-${c}-${k}`,
          prompt: promptOf(128, c * 10 + k),
          sampling: decode(64),
        })) {
          if (e.type === "delta" && first) {
            first = false;
            if (k > 0) ttfts.push(performance.now() - t0);
          }
        }
      }
    }),
  );
  const p50 = percentile(ttfts, 0.5);
  log(
    "\n## TTFT under load (bench model, 32 closed-loop clients with staggered starts, 128-token prompts, 64-token completions)",
  );
  log("| TTFT p50 | TTFT p99 | decode step at 32 streams | 128-token prefill alone | bound (step + chunk) |");
  log("|---:|---:|---:|---:|---:|");
  log(
    `| ${p50.toFixed(0)} ms | ${percentile(ttfts, 0.99).toFixed(0)} ms | ${stepMs.toFixed(1)} ms | ${chunkMs.toFixed(1)} ms | ${(stepMs + chunkMs).toFixed(1)} ms |`,
  );
  record("ttft_load_p50_ms", p50, 1);
  record("ttft_load_bound_ms", stepMs + chunkMs, 1);
}

/**
 * Mean step time of the same 32-sequence decode batch with a pool 1× and 8× as large; on webgpu also the bytes each
 * step moved between host and device (the runner counts what it uploads and downloads).
 */
async function poolSizeIndependence() {
  const dir = await ensureDefaultModel("default", { quiet: true });
  const cfg = loadLlamaConfig(dir);
  const perBlock = kvBytesPerToken(cfg, device) * 16;
  const time = async (numBlocks: number) => {
    const engine = await LLMEngine.create({
      ...backend,
      modelDir: dir,
      maxNumSeqs: 32,
      kvCacheBytes: numBlocks * perBlock,
    });
    await decodeThroughput(engine, 32, 4);
    const transfer = device === "webgpu" ? (Reflect.get(engine, "runner") as WebGpuRunner).totalTransfer : null;
    const before = transfer ? { ...transfer } : null;
    const ms = 1000 / ((await decodeThroughput(engine, 32, quick ? 24 : 64)) / 32); // ms per step
    const perStep =
      transfer && before
        ? {
            up: (transfer.hostToDevice - before.hostToDevice) / (transfer.steps - before.steps),
            down: (transfer.deviceToHost - before.deviceToHost) / (transfer.steps - before.steps),
          }
        : null;
    return { ms, perStep };
  };
  const small = await time(32 * 16);
  const large = await time(8 * 32 * 16);
  const pool = (blocks: number) => `${blocks} blocks, ${((blocks * perBlock) / 2 ** 20).toFixed(0)} MiB`;
  log(`\n## Step time vs pool size (default model, 32 decoding sequences, ${device})`);
  if (device === "webgpu") {
    log("| pool | ms/step | host→device B/step | device→host B/step |\n|---:|---:|---:|---:|");
    for (const [label, r] of [
      [`1× (${pool(32 * 16)})`, small],
      [`8× (${pool(8 * 32 * 16)})`, large],
    ] as const) {
      log(`| ${label} | ${r.ms.toFixed(2)} | ${r.perStep?.up.toFixed(0)} | ${r.perStep?.down.toFixed(0)} |`);
    }
    record("pool_bytes_up_per_step_1x", small.perStep?.up ?? 0, 0);
    record("pool_bytes_up_per_step_8x", large.perStep?.up ?? 0, 0);
    record("pool_bytes_down_per_step_1x", small.perStep?.down ?? 0, 0);
    record("pool_bytes_down_per_step_8x", large.perStep?.down ?? 0, 0);
  } else {
    log(
      `| pool | ms/step |\n|---:|---:|\n| 1× (${pool(32 * 16)}) | ${small.ms.toFixed(2)} |\n| 8× (${pool(8 * 32 * 16)}) | ${large.ms.toFixed(2)} |`,
    );
  }
  log(`ratio 8×/1×: ${(large.ms / small.ms).toFixed(3)} (target ≤ 1.1)`);
  record("pool_step_ms_1x", small.ms);
  record("pool_step_ms_8x", large.ms);
  record("pool_step_ratio_8x_vs_1x", large.ms / small.ms, 3);
}

/**
 * KV memory: how many sequences of mixed lengths a fixed pool holds with paging versus reserving the full
 * context per sequence, and the waste actually measured in the paged pool while the engine runs them (slots
 * allocated but not holding a token, sampled between steps). Waste depends on lengths and block size, not on
 * the weights, so this uses a small generated model with a 2048-token context to keep prefill cheap.
 */
async function kvMemory() {
  const dir = join(cacheDir(), "models", "kv-bench-tiny");
  if (!existsSync(join(dir, "config.json"))) {
    writeRandomLlama(dir, {
      seed: 5,
      tokenizer: "llama2",
      config: {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 2048,
        vocab_size: 32000,
      },
    });
  }
  const cfg = loadLlamaConfig(dir);
  const perBlock = kvBytesPerToken(cfg, device) * 16;
  const numBlocks = 1024;
  const maxLen = cfg.maxPositionEmbeddings;
  const engine = await LLMEngine.create({
    ...backend,
    modelDir: dir,
    maxNumSeqs: 64,
    maxNumBatchedTokens: 2048,
    kvCacheBytes: numBlocks * perBlock,
    enablePrefixCaching: false,
  });
  const lengths: number[] = [];
  let seed = 7;
  const n = quick ? 32 : 64;
  for (let i = 0; i < n; i++) {
    seed = (seed * 48271) % 2147483647;
    lengths.push(256 + (seed % (maxLen - 256)));
  }
  const samples: number[] = [];
  let peakSeqs = 0;
  const sampler = setInterval(() => {
    const running = engine.scheduler.running;
    const used = engine.stats().kvBlocksUsed * 16;
    let stored = 0;
    for (const r of running) stored += r.numComputedTokens;
    if (used > 0) samples.push(1 - stored / used);
    peakSeqs = Math.max(peakSeqs, running.length);
  }, 1);
  await Promise.all(
    lengths.map(async (len, i) => {
      for await (const _ of engine.submit({
        requestId: `kv-${i}`,
        prompt: promptOf(len - 32, i),
        sampling: decode(32),
      })) {
      }
    }),
  );
  clearInterval(sampler);
  const waste = samples.reduce((a, b) => a + b, 0) / Math.max(1, samples.length);
  const reserved = Math.floor((numBlocks * 16) / maxLen);
  log(
    `\n## KV memory (pool of ${numBlocks} blocks = ${numBlocks * 16} tokens, ${n} sequences of 256–${maxLen} tokens)`,
  );
  log("| | sequences held at once |\n|---|---:|");
  log(`| reserving max length (${maxLen}) per sequence | ${reserved} |\n| paged (peak running) | ${peakSeqs} |`);
  log(`measured waste of the paged pool: ${(waste * 100).toFixed(2)} % over ${samples.length} samples (target ≤ 4 %)`);
  record("kv_seqs_reserved", reserved, 0);
  record("kv_seqs_paged", peakSeqs, 0);
  record("kv_waste_pct", waste * 100);
}

/** Time to first token of a request sharing 3/4 of the context with an earlier one, prefix caching on/off. */
async function prefixTtft() {
  const dir = await ensureDefaultModel("bench", { quiet: true });
  const cfg = loadLlamaConfig(dir);
  const prefixLen = Math.floor((cfg.maxPositionEmbeddings * 3) / 4);
  const prefix = promptOf(prefixLen, 1);
  const ttft = async (caching: boolean) => {
    const engine = await LLMEngine.create({
      ...backend,
      modelDir: dir,
      maxNumSeqs: 8,
      maxNumBatchedTokens: 2048,
      enablePrefixCaching: caching,
    });
    for await (const _ of engine.submit({ requestId: "warm", prompt: [...prefix, 5, 6, 7], sampling: decode(1) })) {
    }
    const times: number[] = [];
    for (let i = 0; i < (quick ? 2 : 4); i++) {
      const t0 = performance.now();
      for await (const e of engine.submit({
        requestId: `q${i}`,
        prompt: [...prefix, 900 + i, 901, 902, 903],
        sampling: decode(1),
      })) {
        if (e.type === "delta") {
          times.push(performance.now() - t0);
          break;
        }
      }
    }
    times.sort((a, b) => a - b);
    return times[Math.floor(times.length / 2)];
  };
  const on = await ttft(true);
  const off = await ttft(false);
  log(`\n## TTFT with a shared ${prefixLen}-token prefix (bench model)`);
  log(`| prefix caching | TTFT ms |\n|---|---:|\n| off | ${off.toFixed(1)} |\n| on | ${on.toFixed(1)} |`);
  log(`ratio on/off: ${(on / off).toFixed(3)} (target ≤ 0.25)`);
  record("prefix_ttft_ms_off", off, 1);
  record("prefix_ttft_ms_on", on, 1);
  record("prefix_ttft_ratio", on / off, 3);
}

/**
 * Read bandwidth as ONNX Runtime achieves it here, counted as bytes read from a 1 GiB buffer (far larger than
 * any cache): the best of a row-wise ReduceMax and a matrix-vector product streaming the buffer as its matrix,
 * each the best of several runs on all cores. A memcpy's "bytes copied" would understate it 2×.
 */
async function readBandwidth(): Promise<number> {
  const { onnx } = onnxPkg;
  const vi = (name: string, dims: number[]) => ({
    name,
    type: { tensorType: { elemType: 1, shape: { dim: dims.map((d) => ({ dimValue: d })) } } },
  });
  const rows = 4096;
  const cols = (256 * 1024 * 1024) / rows; // 1 GiB of f32
  const probe = (node: object, initializer: object[], outDims: number[]) =>
    onnx.ModelProto.encode(
      onnx.ModelProto.create({
        irVersion: 10,
        opsetImport: [{ domain: "", version: 21 }],
        graph: { name: "bw", node: [node], input: [vi("x", [rows, cols])], output: [vi("y", outDims)], initializer },
      }),
    ).finish();
  const probes = [
    probe(
      { opType: "ReduceMax", input: ["x", "axes"], output: ["y"], attribute: [{ name: "keepdims", type: 2, i: 0 }] },
      [{ name: "axes", dims: [1], dataType: 7, int64Data: [1] }],
      [rows],
    ),
    // y[1, cols] = v[1, rows] · x[rows, cols]
    probe(
      { opType: "MatMul", input: ["v", "x"], output: ["y"] },
      [{ name: "v", dims: [1, rows], dataType: 1, floatData: Array(rows).fill(0.5) }],
      [1, cols],
    ),
  ];
  const x = new ort.Tensor("float32", new Float32Array(rows * cols).fill(1), [rows, cols]);
  let best = Number.POSITIVE_INFINITY;
  for (const graph of probes) {
    const session = await ort.InferenceSession.create(graph, {
      intraOpNumThreads: threads,
      extra: { session: { "intra_op.allow_spinning": "0" } },
    });
    for (let i = 0; i < (quick ? 4 : 8); i++) {
      const t0 = performance.now();
      await session.run({ x });
      best = Math.min(best, performance.now() - t0);
    }
    await session.release();
  }
  return (rows * cols * 4) / (best / 1000);
}

/** Single-stream decode on the bench model as a fraction of what memory bandwidth allows. */
async function bandwidthUtilisation() {
  const dir = await ensureDefaultModel("bench", { quiet: true });
  const cfg = loadLlamaConfig(dir);
  const weights = LlamaWeights.open(dir, cfg);
  // Bytes a decode step reads: every weight matrix once (f32 as run), except the embedding (one row).
  let params = 0;
  for (const t of weights.tensors.values())
    if (t.name !== "model.embed_tokens.weight") params += t.shape.reduce((a, b) => a * b, 1);
  if (cfg.tieWordEmbeddings) params += cfg.vocabSize * cfg.hiddenSize;
  const bytesPerToken = params * 4;
  const engine = await LLMEngine.create({ ...backend, modelDir: dir, maxNumSeqs: 1 });
  await decodeThroughput(engine, 1, 4);
  const tps = await decodeThroughput(engine, 1, quick ? 32 : 128);
  const bw = await readBandwidth();
  const frac = (tps * bytesPerToken) / bw;
  log("\n## Single-stream decode vs memory bandwidth (bench model)");
  log(
    `weights read per token: ${(bytesPerToken / 1e6).toFixed(1)} MB; measured read bandwidth: ${(bw / 1e9).toFixed(1)} GB/s`,
  );
  log(
    `decode: ${tps.toFixed(1)} tokens/s = ${((tps * bytesPerToken) / 1e9).toFixed(1)} GB/s = ${(frac * 100).toFixed(1)} % of bandwidth (target ≥ 70 %)`,
  );
  record("bw_read_gbps", bw / 1e9);
  record("bw_decode_tps", tps, 1);
  record("bw_weight_mb_per_token", bytesPerToken / 1e6, 1);
  record("bw_utilisation_pct", frac * 100, 1);
}

log(`# llama-edge engine benchmark${quick ? " (quick)" : ""}, --device ${device}`);
log(
  `machine: ${cpus().length} × ${cpus()[0]?.model ?? "cpu"}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, node ${process.version}, onnxruntime-node ${ort.env.versions.node}, ${threads} intra-op threads`,
);
results.machine = `${cpus().length}x ${cpus()[0]?.model ?? "cpu"}`;
results.device = device;
results.threads = threads;
results.mode = quick ? "quick" : "full";
// quantization quality and the memory-bandwidth roofline are properties of the CPU provider
const cpuOnly = (name: string, run: () => Promise<unknown>) => async () => {
  if (device === "cpu") await run();
  else log(`\n(${name}: CPU provider only, skipped on ${device})`);
};
/** Sections in run order; `--only <name>` (repeatable) runs just those. */
const SECTIONS: Record<string, () => Promise<unknown>> = {
  throughput: async () => {
    await throughputTable("default", quick ? [1, 8, 32] : [1, 8, 32, 64], quick ? 24 : 64);
    await throughputTable("bench", quick ? [1, 32] : [1, 8, 32, 64], quick ? 16 : 48);
  },
  weights: weightFormatTable,
  quality: cpuOnly("quantized quality", qualityRows),
  ttft: ttftUnderLoad,
  sampling: samplingCost,
  structured: structuredOutput,
  mixed: mixedWorkload,
  pool: poolSizeIndependence,
  kv: kvMemory,
  prefix: prefixTtft,
  bandwidth: cpuOnly("decode vs memory bandwidth", bandwidthUtilisation),
};
for (const [name, run] of Object.entries(SECTIONS)) if (!only || only.includes(name)) await run();
if (device !== "cpu") log("\n(llama2-7b rows: CPU provider only)");
else if (big && (!only || only.includes("big"))) await bigModelRows();
else if (!only) log("\n(llama2-7b rows skipped: run with --big; they generate a 13 GB random checkpoint once)");
if (json) log(JSON.stringify(results));
