/**
 * Constrained decoding in the serving engine on real ONNX Runtime: outputs follow their schema whatever the
 * sampling, end with `stop` when the grammar completes or `length` (partial) when max_tokens cuts them, and
 * batching, preemption, prefix caching and aborts change nothing a constrained request produces.
 */
import { Ajv } from "ajv";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { GrammarSpec } from "../src/engine/grammar.ts";
import { type EngineOptions, LLMEngine } from "../src/engine/llm-engine.ts";
import { ModelRunner } from "../src/engine/model-runner.ts";
import type { EngineEvent, FinishReason, SamplingParams } from "../src/engine/types.ts";
import { loadLlamaConfig } from "../src/model/config.ts";
import { ensureDefaultModel } from "../src/model/default-model.ts";

interface Result {
  tokenIds: number[];
  text: string;
  finishReason: FinishReason | null;
  cachedTokens: number;
}

async function collect(stream: AsyncIterable<EngineEvent>): Promise<Result> {
  const r: Result = { tokenIds: [], text: "", finishReason: null, cachedTokens: 0 };
  for await (const e of stream) {
    if (e.type === "delta") {
      r.tokenIds.push(...e.tokenIds);
      r.text += e.text;
    } else {
      r.finishReason = e.finishReason;
      r.cachedTokens = e.usage.cachedTokens;
    }
  }
  return r;
}

const SCHEMA = {
  type: "object",
  properties: {
    name: { type: "string", pattern: "^[a-z]{1,8}$" },
    age: { type: "integer", minimum: 0, maximum: 120 },
    pets: { type: "array", items: { enum: ["cat", "dog", "fish"] }, maxItems: 3 },
    ok: { type: "boolean" },
  },
  required: ["name", "age", "ok"],
};
const spec: GrammarSpec = { type: "json_schema", schema: SCHEMA };
const validate = new Ajv().compile(SCHEMA);
const sampled = (seed: number, maxTokens = 96): Partial<SamplingParams> => ({ temperature: 1, seed, maxTokens });

let modelDir: string;
const engines: LLMEngine[] = [];
async function engine(opts: Partial<EngineOptions> = {}): Promise<LLMEngine> {
  const e = await LLMEngine.create({ modelDir, ...opts });
  engines.push(e);
  return e;
}

beforeAll(async () => {
  modelDir = await ensureDefaultModel("default", { quiet: true });
});

afterAll(() => {
  engines.length = 0;
});

describe("constrained decoding in the engine", () => {
  it("every output parses and validates, greedy and sampled, and ends with stop", async () => {
    const e = await engine({ maxNumSeqs: 16 });
    const results = await Promise.all(
      Array.from({ length: 12 }, (_, seed) =>
        collect(
          e.submit({
            requestId: `v${seed}`,
            prompt: "Describe a person as JSON:",
            sampling: seed === 0 ? { temperature: 0, maxTokens: 96 } : sampled(seed),
            grammar: spec,
          }),
        ),
      ),
    );
    for (const r of results) {
      expect(r.finishReason).toBe("stop");
      expect(validate(JSON.parse(r.text)), r.text).toBe(true);
      // The last token is the model's eos: a completed grammar allows nothing else.
      expect(r.tokenIds.at(-1)).toBe(2);
    }
  });

  it("stops when the grammar completes even with ignore_eos", async () => {
    const e = await engine();
    const r = await collect(
      e.submit({ requestId: "ie", prompt: "JSON:", sampling: { ...sampled(3), ignoreEos: true }, grammar: spec }),
    );
    expect(r.finishReason).toBe("stop");
    expect(validate(JSON.parse(r.text))).toBe(true);
  });

  it("ends with length and the partial text when max_tokens cuts the grammar short", async () => {
    const e = await engine();
    const full = await collect(e.submit({ requestId: "f", prompt: "JSON:", sampling: sampled(5), grammar: spec }));
    const cut = await collect(e.submit({ requestId: "c", prompt: "JSON:", sampling: sampled(5, 6), grammar: spec }));
    expect(cut.finishReason).toBe("length");
    expect(cut.tokenIds).toEqual(full.tokenIds.slice(0, 6));
    expect(full.text.startsWith(cut.text)).toBe(true);
    expect(() => JSON.parse(cut.text)).toThrow();
  });

  it("batching, preemption, prefix caching and the grammar cache change no constrained output", async () => {
    const seeds = Array.from({ length: 10 }, (_, i) => i + 20);
    // Over a block (16 tokens) long, so the prefix cache has whole blocks to reuse.
    const prompt = (i: number) => `Once upon a time there was a village by the sea. Person number ${i}, as JSON:`;
    const base = await engine({ maxNumSeqs: 1, enablePrefixCaching: false });
    const alone: Result[] = [];
    for (const [i, seed] of seeds.entries()) {
      alone.push(
        await collect(base.submit({ requestId: `a${i}`, prompt: prompt(i), sampling: sampled(seed), grammar: spec })),
      );
    }
    // A pool of 8 blocks for 10 sequences of up to ~110 tokens: most are preempted and recomputed mid-grammar.
    const perBlock = ModelRunner.kvBytesPerToken(loadLlamaConfig(modelDir)) * 16;
    const tight = await engine({ maxNumSeqs: 10, kvCacheBytes: 8 * perBlock });
    const batched = await Promise.all(
      seeds.map((seed, i) =>
        collect(tight.submit({ requestId: `b${i}`, prompt: prompt(i), sampling: sampled(seed), grammar: spec })),
      ),
    );
    expect(tight.stats().preempted).toBeGreaterThan(0);
    expect(batched.map((r) => r.tokenIds)).toEqual(alone.map((r) => r.tokenIds));
    // Again through the prefix cache (same prompts, blocks reused).
    const cachedEngine = await engine({ maxNumSeqs: 10 });
    for (const pass of [0, 1]) {
      const again = await Promise.all(
        seeds.map((seed, i) =>
          collect(
            cachedEngine.submit({
              requestId: `p${pass}-${i}`,
              prompt: prompt(i),
              sampling: sampled(seed),
              grammar: spec,
            }),
          ),
        ),
      );
      if (pass === 1) expect(again.some((r) => r.cachedTokens > 0)).toBe(true);
      expect(again.map((r) => r.tokenIds)).toEqual(alone.map((r) => r.tokenIds));
    }
  });

  it("an abort mid-grammar frees the sequence; the others finish untouched", async () => {
    const e = await engine({ maxNumSeqs: 4 });
    const ref = await collect(e.submit({ requestId: "ref", prompt: "JSON:", sampling: sampled(9), grammar: spec }));
    const victim = e.submit({ requestId: "victim", prompt: "JSON:", sampling: sampled(8), grammar: spec });
    const other = collect(e.submit({ requestId: "other", prompt: "JSON:", sampling: sampled(9), grammar: spec }));
    let n = 0;
    for await (const ev of victim) if (ev.type === "delta" && ++n === 3) break; // leaving the loop aborts
    expect((await other).tokenIds).toEqual(ref.tokenIds);
    // Aborted while its grammar compiles (a schema never seen before): nothing leaks, nothing is emitted.
    const fresh = e.submit({
      requestId: "early",
      prompt: "JSON:",
      sampling: sampled(1),
      grammar: { type: "json_schema", schema: { type: "array", items: { type: "integer" }, maxItems: 2 } },
    });
    e.abort("early");
    const early = await collect(fresh);
    expect(early).toMatchObject({ finishReason: "abort", tokenIds: [] });
    expect(e.stats()).toMatchObject({ running: 0, waiting: 0, kvBlocksUsed: 0 });
  });

  it("a schema XGrammar cannot use fails only its own request", async () => {
    const e = await engine();
    const bad = collect(
      e.submit({
        requestId: "bad",
        prompt: "JSON:",
        sampling: sampled(1),
        grammar: { type: "json_schema", schema: { type: "string", pattern: "(?=x)y" } },
      }),
    );
    const good = collect(e.submit({ requestId: "good", prompt: "JSON:", sampling: sampled(1), grammar: spec }));
    await expect(bad).rejects.toMatchObject({ name: "GrammarError", message: /Lookahead/ });
    expect(validate(JSON.parse((await good).text))).toBe(true);
  });
});
