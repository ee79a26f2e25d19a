/**
 * The engine's ONNX Runtime graph against the plain TypeScript reference forward pass: logits within a tight
 * tolerance at several positions, and greedy generation token for token, on the default model and on random
 * shapes exercising GQA, tied embeddings and llama3 rope scaling.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LLMEngine } from "../src/engine/llm-engine.ts";
import { ModelRunner, type StepSequence } from "../src/engine/model-runner.ts";
import { compileModel } from "../src/model/compiled-model.ts";
import { type LlamaConfig, loadLlamaConfig } from "../src/model/config.ts";
import { ensureDefaultModel } from "../src/model/default-model.ts";
import { writeRandomLlama } from "../src/model/random-model.ts";
import { LlamaWeights } from "../src/model/weights.ts";
import { LlamaTokenizer } from "../src/tokenizer/tokenizer.ts";
import { argmax, ReferenceLlama } from "./reference-llama.ts";

const BLOCK = 16;

async function load(dir: string) {
  const cfg = loadLlamaConfig(dir);
  const runner = await ModelRunner.create(compileModel(dir, cfg), cfg, { numBlocks: 64, blockSize: BLOCK });
  const reference = new ReferenceLlama(cfg, LlamaWeights.open(dir, cfg));
  return { cfg, runner, reference };
}

/** Blocks 0..n-1 in a scrambled order, so a wrong slot computation cannot pass by accident. */
function blockTable(n: number, offset = 0): number[] {
  return Array.from({ length: n }, (_, i) => offset + ((i * 7) % n));
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

/** Prefill `prompt` in chunks, then decode greedily, comparing logits with the reference at every position. */
async function compareLogits(
  runner: ModelRunner,
  reference: ReferenceLlama,
  cfg: LlamaConfig,
  prompt: number[],
  steps: number,
  chunk: number,
) {
  reference.reset();
  const table = blockTable(Math.ceil((prompt.length + steps) / BLOCK) + 1, 3);
  let refLogits = new Float64Array(0);
  let pos = 0;
  let worst = 0;
  while (pos < prompt.length) {
    const n = Math.min(chunk, prompt.length - pos);
    const last = pos + n === prompt.length;
    const { logits } = await runner.execute([
      { tokenIds: prompt.slice(pos, pos + n), startPos: pos, blockTable: table, needLogits: last },
    ]);
    for (let i = pos; i < pos + n; i++) refLogits = reference.forward(prompt[i], i);
    if (last) worst = Math.max(worst, maxAbsDiff(logits, refLogits) / maxAbs(refLogits));
    pos += n;
  }
  const tokens = [...prompt];
  for (let s = 0; s < steps; s++) {
    const next = argmax(refLogits);
    tokens.push(next);
    const { logits } = await runner.execute([
      { tokenIds: [next], startPos: tokens.length - 1, blockTable: table, needLogits: true },
    ]);
    refLogits = reference.forward(next, tokens.length - 1);
    worst = Math.max(worst, maxAbsDiff(logits.subarray(0, cfg.vocabSize), refLogits) / maxAbs(refLogits));
  }
  return worst;
}

describe("default model (stories15M shape, random weights)", () => {
  let ctx: Awaited<ReturnType<typeof load>>;
  let dir: string;
  beforeAll(async () => {
    dir = await ensureDefaultModel("default", { quiet: true });
    ctx = await load(dir);
  });

  it("matches the reference logits at every position, prefilled whole and in chunks", async () => {
    const tok = LlamaTokenizer.fromDir(dir);
    for (const [text, chunk] of [
      ["Once upon a time", 64],
      ["The quick brown fox jumps over the lazy dog. It was a sunny day in the park.", 5],
      ["", 1],
    ] as const) {
      const prompt = tok.encode(text);
      const err = await compareLogits(ctx.runner, ctx.reference, ctx.cfg, prompt, 6, chunk);
      expect(err, `prompt ${JSON.stringify(text)}`).toBeLessThan(1e-4);
    }
  });

  it("generates the same 64 greedy tokens as the reference", async () => {
    const engine = await LLMEngine.create({ modelDir: dir, maxNumSeqs: 4 });
    const prompt = engine.tokenizer.encode("Lily and Tom went to the park");
    const expected = ctx.reference.generateGreedy(prompt, 64);
    const got: number[] = [];
    for await (const e of engine.submit({
      requestId: "g",
      prompt,
      sampling: { temperature: 0, maxTokens: 64, ignoreEos: true },
    })) {
      if (e.type === "delta") got.push(...e.tokenIds);
    }
    expect(got).toEqual(expected);
  });

  it("runs a mixed batch (prefill chunk + decode tokens) exactly as each sequence alone", async () => {
    const { runner, reference } = ctx;
    // sequence A: 20 tokens prefilled earlier; B: 9 tokens; in one step A decodes and B prefills
    const a = [
      1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 739, 471, 263, 6575, 1460, 2462, 297,
    ];
    const b = [1, 9038, 2501, 263, 931, 29892, 727, 471, 263];
    const tableA = [10, 11];
    const tableB = [20];
    await runner.execute([{ tokenIds: a.slice(0, 19), startPos: 0, blockTable: tableA, needLogits: false }]);
    const seqs: StepSequence[] = [
      { tokenIds: [a[19]], startPos: 19, blockTable: tableA, needLogits: true },
      { tokenIds: b, startPos: 0, blockTable: tableB, needLogits: true },
    ];
    const { logits } = await runner.execute(seqs);
    reference.reset();
    let refA = new Float64Array(0);
    a.forEach((t, i) => {
      refA = reference.forward(t, i);
    });
    reference.reset();
    let refB = new Float64Array(0);
    b.forEach((t, i) => {
      refB = reference.forward(t, i);
    });
    const V = ctx.cfg.vocabSize;
    expect(maxAbsDiff(logits.subarray(0, V), refA) / maxAbs(refA)).toBeLessThan(1e-4);
    expect(maxAbsDiff(logits.subarray(V, 2 * V), refB) / maxAbs(refB)).toBeLessThan(1e-4);
  });
});

describe("random shapes", () => {
  const dirs: string[] = [];
  afterAll(() => {
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });
  const shapes: [string, Record<string, unknown>][] = [
    ["GQA (8 heads, 2 kv heads)", { num_attention_heads: 8, num_key_value_heads: 2 }],
    ["MQA + tied embeddings", { num_attention_heads: 4, num_key_value_heads: 1, tie_word_embeddings: true }],
    [
      "llama3 rope scaling, head_dim given",
      {
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        rope_theta: 500000,
        rope_scaling: {
          rope_type: "llama3",
          factor: 8,
          low_freq_factor: 1,
          high_freq_factor: 4,
          original_max_position_embeddings: 64,
        },
      },
    ],
  ];
  for (const [name, overrides] of shapes) {
    it(`${name}: logits match and 32 greedy tokens are identical`, async () => {
      const dir = mkdtempSync(join(tmpdir(), "llama-shape-"));
      dirs.push(dir);
      writeRandomLlama(dir, {
        seed: 7,
        tokenizer: "llama2",
        config: {
          hidden_size: 64,
          intermediate_size: 160,
          num_hidden_layers: 2,
          max_position_embeddings: 256,
          vocab_size: 32000,
          ...overrides,
        },
      });
      const { cfg, runner, reference } = await load(dir);
      const prompt = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203];
      expect(await compareLogits(runner, reference, cfg, prompt, 8, 5)).toBeLessThan(1e-4);

      const engine = await LLMEngine.create({ modelDir: dir, maxNumSeqs: 2 });
      const got: number[] = [];
      for await (const e of engine.submit({
        requestId: "x",
        prompt,
        sampling: { temperature: 0, maxTokens: 32, ignoreEos: true },
      })) {
        if (e.type === "delta") got.push(...e.tokenIds);
      }
      expect(got).toEqual(reference.generateGreedy(prompt, 32));
    });
  }
});
