/**
 * The WebGPU backend (`--device webgpu`) on whatever Vulkan driver the machine has: in CI that is Mesa's lavapipe,
 * a CPU implementation (see .ci/run), so these tests check correctness and how costs scale, not speed. The
 * serving behaviours (batching, preemption, prefix cache, aborts) run on it too, in serving-engine.test.ts.
 */
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DeviceError } from "../src/engine/device.ts";
import type { GrammarSpec } from "../src/engine/grammar.ts";
import { type EngineOptions, LLMEngine } from "../src/engine/llm-engine.ts";
import type { SamplingRow } from "../src/engine/sampler.ts";
import { validateSamplingParams } from "../src/engine/sampling-params.ts";
import type { StepSequence } from "../src/engine/step-inputs.ts";
import type { EngineEvent, SamplingParams } from "../src/engine/types.ts";
import { WebGpuRunner } from "../src/engine/webgpu-runner.ts";
import { compileModel } from "../src/model/compiled-model.ts";
import { loadLlamaConfig } from "../src/model/config.ts";
import { ensureDefaultModel } from "../src/model/default-model.ts";
import { writeGqaModel } from "./gqa-model.ts";

interface Generated {
  tokenIds: number[];
  logprobs: number[];
}

async function generate(opts: EngineOptions, prompt: number[], sampling: Partial<SamplingParams>): Promise<Generated> {
  const engine = await LLMEngine.create(opts);
  const r: Generated = { tokenIds: [], logprobs: [] };
  for await (const e of engine.submit({ requestId: "g", prompt, sampling }) as AsyncIterable<EngineEvent>) {
    if (e.type !== "delta") continue;
    r.tokenIds.push(...e.tokenIds);
    for (const lp of e.logprobs ?? []) r.logprobs.push(lp.logprob);
  }
  return r;
}

const PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203];
const removals: (() => void)[] = [];
afterAll(() => {
  for (const remove of removals) remove();
});

function gqaModel(): string {
  const { dir, remove } = writeGqaModel();
  removals.push(remove);
  return dir;
}

describe("greedy output equals the CPU provider's", () => {
  // WebGPU's kernels sum in other orders than the CPU's, so logits differ in the last bits (f32) or in f16's
  // precision: the tokens must be the same, the logprobs (the logits path) within the stated tolerance.
  describe("default model (stories15M shape), 24 tokens", () => {
    const sampling = { temperature: 0, maxTokens: 24, ignoreEos: true, logprobs: true };
    let opts: EngineOptions;
    let cpu: Generated;
    beforeAll(async () => {
      opts = {
        modelDir: await ensureDefaultModel("default", { quiet: true }),
        maxNumSeqs: 2,
        kvCacheBytes: 32 * 2 ** 20,
      };
      cpu = await generate({ ...opts, executionProvider: "cpu" }, PROMPT, sampling);
    });

    it("f32 weights: the same tokens, logprobs within 1e-3", async () => {
      const gpu = await generate({ ...opts, executionProvider: "webgpu", quantization: "none" }, PROMPT, sampling);
      expect(gpu.tokenIds).toEqual(cpu.tokenIds);
      expect(gpu.logprobs).toHaveLength(24);
      for (let i = 0; i < 24; i++) expect(Math.abs(gpu.logprobs[i] - cpu.logprobs[i])).toBeLessThan(1e-3);
    });

    it("f16 weights (the default where the adapter runs shader-f16): the same tokens, logprobs within 0.1", async () => {
      expect(await WebGpuRunner.supportsF16()).toBe(true); // lavapipe 25 exposes shader-f16
      const f16 = await generate({ ...opts, executionProvider: "webgpu" }, PROMPT, sampling); // no quantization: f16
      expect(f16.tokenIds).toEqual(cpu.tokenIds);
      // f16 keeps 11 bits of mantissa: measured 0.06 at worst over these positions
      for (let i = 0; i < 24; i++) expect(Math.abs(f16.logprobs[i] - cpu.logprobs[i])).toBeLessThan(0.1);
    });
  });

  it("GQA model (8 heads, 2 kv heads), f32: 48 tokens, from the device's argmax alone", async () => {
    const modelDir = gqaModel();
    const sampling = { temperature: 0, maxTokens: 48, ignoreEos: true };
    const opts = { modelDir, maxNumSeqs: 2, kvCacheBytes: 32 * 2 ** 20 };
    const cpu = await generate({ ...opts, executionProvider: "cpu" }, PROMPT, sampling);
    const gpu = await generate({ ...opts, executionProvider: "webgpu", quantization: "none" }, PROMPT, sampling);
    expect(gpu.tokenIds).toHaveLength(48);
    expect(gpu.tokenIds).toEqual(cpu.tokenIds);
  });
});

describe("sampling on the device", () => {
  const requests: Partial<SamplingParams>[] = [
    { temperature: 0.8, seed: 1 },
    { temperature: 1, topK: 20, seed: 2 },
    { temperature: 0.9, topP: 0.9, seed: 3 },
    { temperature: 1.2, minP: 0.05, seed: 4, logprobs: true, topLogprobs: 3 },
    { temperature: 0.7, repetitionPenalty: 1.3, seed: 5 }, // edits logits: sampled on the host from its row
  ];

  async function sampleAll(device: "cpu" | "webgpu", modelDir: string, reqs: Partial<SamplingParams>[]) {
    const engine = await LLMEngine.create({ modelDir, executionProvider: device, quantization: "none", maxNumSeqs: 8 });
    const results = await Promise.all(
      reqs.map(async (sampling, i) => {
        const ids: number[] = [];
        for await (const e of engine.submit({
          requestId: `s${i}`,
          prompt: PROMPT,
          sampling: { ...sampling, maxTokens: 12, ignoreEos: true },
        })) {
          if (e.type === "delta") ids.push(...e.tokenIds);
        }
        return ids;
      }),
    );
    return { engine, results };
  }

  it("seeded requests (temperature, top_k, top_p, min_p, penalties) give the CPU provider's tokens", async () => {
    const modelDir = gqaModel();
    const cpu = await sampleAll("cpu", modelDir, requests);
    const gpu = await sampleAll("webgpu", modelDir, requests);
    expect(gpu.results).toEqual(cpu.results);
  });

  it("grammar-constrained requests (their rows gathered from the device, masked on the host) give the CPU's tokens", async () => {
    const modelDir = gqaModel();
    const grammar: GrammarSpec = {
      type: "json_schema",
      schema: { type: "object", properties: { n: { type: "integer" } }, required: ["n"] },
    };
    const run = async (device: "cpu" | "webgpu") => {
      const engine = await LLMEngine.create({
        modelDir,
        executionProvider: device,
        quantization: "none",
        maxNumSeqs: 4,
      });
      return Promise.all(
        [{ temperature: 0 }, { temperature: 1, seed: 3 }].map(async (sampling, i) => {
          let text = "";
          let finish = "";
          for await (const e of engine.submit({
            requestId: `j${i}`,
            prompt: PROMPT,
            sampling: { ...sampling, maxTokens: 48 },
            grammar,
          })) {
            if (e.type === "delta") text += e.text;
            if (e.type === "final") finish = e.finishReason;
          }
          return { text, finish };
        }),
      );
    };
    const [cpu, gpu] = [await run("cpu"), await run("webgpu")];
    expect(gpu).toEqual(cpu);
    // a random model may spend its tokens on whitespace or digits: a completed object parses, a cut one is a prefix
    for (const { text, finish } of gpu) {
      if (finish === "stop") expect(typeof JSON.parse(text).n).toBe("number");
      else expect(text).toMatch(/^\s*\{/);
    }
  });

  it("downloads candidates, not the vocabulary: a sampling step moves far less than its logits", async () => {
    const modelDir = gqaModel();
    const { engine } = await sampleAll("webgpu", modelDir, requests.slice(0, 4));
    const runner = Reflect.get(engine, "runner") as WebGpuRunner;
    const logitsBytes = 4 * 32000 * 4; // the last step samples all four rows
    expect(runner.lastStepTransfer.deviceToHost).toBeGreaterThan(0);
    expect(runner.lastStepTransfer.deviceToHost).toBeLessThan(logitsBytes / 20);
  });
});

describe("the KV cache stays on the device", () => {
  let modelDir: string;
  beforeAll(() => {
    modelDir = gqaModel();
  });

  /** One engine step as the engine takes it: run, then sample. */
  const step = async (runner: WebGpuRunner, seqs: StepSequence[], rows: SamplingRow[]) =>
    runner.sample(await runner.run(seqs), rows);

  const greedyRow = (): SamplingRow => ({
    params: validateSamplingParams({ temperature: 0 }, { vocabSize: 32000 }),
    rng: null,
    promptTokenIds: [],
    outputTokenIds: [],
  });

  /** Prefill two sequences, then decode both for `steps` steps; returns each step's transfer and the tokens. */
  async function runSteps(runner: WebGpuRunner, steps: number) {
    const tables = [
      [3, 9, 4],
      [7, 1, 12],
    ];
    const seqs: StepSequence[] = [
      { tokenIds: PROMPT, startPos: 0, blockTable: tables[0], needLogits: true },
      { tokenIds: PROMPT.slice(0, 5), startPos: 0, blockTable: tables[1], needLogits: true },
    ];
    const transfers: number[][] = [];
    const tokens: number[][] = [];
    for (let s = 0; s <= steps; s++) {
      const out = await step(runner, seqs, [greedyRow(), greedyRow()]);
      transfers.push([runner.lastStepTransfer.hostToDevice, runner.lastStepTransfer.deviceToHost]);
      tokens.push(out.map((t) => t.tokenId));
      for (const [i, q] of seqs.entries()) {
        seqs[i] = {
          tokenIds: [out[i].tokenId],
          startPos: q.startPos + q.tokenIds.length,
          blockTable: q.blockTable,
          needLogits: true,
        };
      }
    }
    return { transfers, tokens };
  }

  it("with the pool 8x larger, every step moves the same bytes (and none of the pool)", async () => {
    const cfg = loadLlamaConfig(modelDir);
    const model = compileModel(modelDir, cfg);
    const small = await WebGpuRunner.create(model, cfg, { numBlocks: 16, blockSize: 16, maxNumSeqs: 2 });
    const large = await WebGpuRunner.create(model, cfg, { numBlocks: 128, blockSize: 16, maxNumSeqs: 2 });
    const a = await runSteps(small, 6);
    const b = await runSteps(large, 6);
    expect(b.tokens).toEqual(a.tokens);
    expect(b.transfers).toEqual(a.transfers);
    // one layer's keys of the small pool is already more than any step moves
    const arrayBytes = 16 * 16 * cfg.numKeyValueHeads * cfg.headDim * 4;
    for (const [up, down] of a.transfers) expect(up + down).toBeLessThan(arrayBytes);
  });

  it("copies blocks on the device (copy-on-write): a sequence reading the copy continues identically", async () => {
    const cfg = loadLlamaConfig(modelDir);
    const runner = await WebGpuRunner.create(compileModel(modelDir, cfg), cfg, {
      numBlocks: 16,
      blockSize: 16,
      maxNumSeqs: 2,
    });
    const prompt = PROMPT.slice(0, 10); // one partial block
    const [first] = await step(
      runner,
      [{ tokenIds: prompt, startPos: 0, blockTable: [2], needLogits: true }],
      [greedyRow()],
    );
    await runner.copyBlocks([[2, 11]]);
    const next = (table: number[]) =>
      step(
        runner,
        [{ tokenIds: [first.tokenId], startPos: prompt.length, blockTable: table, needLogits: true }],
        [greedyRow()],
      );
    const [fromOriginal] = await next([2]);
    const [fromCopy] = await next([11]);
    const [fromEmpty] = await next([5]);
    expect(fromCopy.tokenId).toBe(fromOriginal.tokenId);
    expect(fromEmpty.tokenId).not.toBe(fromOriginal.tokenId); // the check can fail: a block without the prompt differs
  });
});

describe("a device that cannot be used", () => {
  it("without a GPU adapter, the worker exits at start with one line saying so", () => {
    // The Vulkan loader finds no driver: Dawn reports no adapter. The worker fails before it connects to NATS.
    const bin = fileURLToPath(new URL("../bin/llama-worker.js", import.meta.url));
    const r = spawnSync(
      process.execPath,
      [bin, "serve", "--model", gqaModel(), "--device", "webgpu", "--nats", "nats://127.0.0.1:1", "--health-port", "0"],
      {
        env: { ...process.env, VK_ICD_FILENAMES: "/nonexistent/icd.json", VK_DRIVER_FILES: "/nonexistent/icd.json" },
        encoding: "utf8",
        timeout: 120_000,
      },
    );
    expect(r.status).toBe(1);
    const fatal = r.stdout
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { level: number; msg: string })
      .filter((l) => l.level === 60);
    expect(fatal).toHaveLength(1);
    expect(fatal[0].msg).toMatch(/^webgpu: no usable GPU adapter \(.*\)\. Install a Vulkan driver/);
  });

  it("a device lost mid-run ends every request with its reason, refuses new ones and tells the host once", async () => {
    const lost: DeviceError[] = [];
    const engine = await LLMEngine.create({
      modelDir: gqaModel(),
      executionProvider: "webgpu",
      maxNumSeqs: 4,
      onDeviceError: (e) => lost.push(e),
    });
    const runner = Reflect.get(engine, "runner") as WebGpuRunner;
    const run = runner.run.bind(runner);
    let calls = 0;
    runner.run = async (seqs) => {
      if (++calls === 3) throw new DeviceError("webgpu: the device was lost (injected)");
      return run(seqs);
    };
    const results = await Promise.all(
      [0, 1, 2].map(async (i) => {
        const out: number[] = [];
        try {
          for await (const e of engine.submit({ requestId: `r${i}`, prompt: PROMPT, sampling: { maxTokens: 20 } })) {
            if (e.type === "delta") out.push(...e.tokenIds);
          }
          return "finished";
        } catch (e) {
          return (e as Error).message;
        }
      }),
    );
    expect(results).toEqual(Array(3).fill("the engine step failed: webgpu: the device was lost (injected)"));
    expect(lost).toHaveLength(1);
    expect(() => engine.submit({ requestId: "late", prompt: PROMPT })).toThrow("webgpu: the device was lost");
  });
});
