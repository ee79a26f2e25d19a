/**
 * One request's trouble never reaches another: hostile sampling parameters, a NaN row in one sequence's logits
 * and a failed model run each end (at most) the requests they belong to, while every other request in the same
 * steps produces exactly what it produces alone, and the engine keeps serving.
 */
import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import { EngineSequenceError, EngineStepError, LLMEngine } from "../src/engine/llm-engine.ts";
import type { ModelRunner, StepOutput } from "../src/engine/model-runner.ts";
import { SamplingParamError } from "../src/engine/sampling-params.ts";
import type { SchedulerOutput } from "../src/engine/scheduler.ts";
import type { EngineEvent, SamplingParams } from "../src/engine/types.ts";
import { ensureDefaultModel } from "../src/model/default-model.ts";

interface Outcome {
  tokenIds: number[];
  text: string;
  error: Error | null;
}

async function run(stream: AsyncIterable<EngineEvent>): Promise<Outcome> {
  const o: Outcome = { tokenIds: [], text: "", error: null };
  try {
    for await (const e of stream) {
      if (e.type === "delta") {
        o.tokenIds.push(...e.tokenIds);
        o.text += e.text;
      }
    }
  } catch (e) {
    o.error = e as Error;
  }
  return o;
}

/** The well-behaved requests: greedy and seeded sampling, with penalties, all deterministic. */
const normal: { prompt: number[]; sampling: Partial<SamplingParams> }[] = [
  { prompt: [1, 450, 4996, 17354], sampling: { temperature: 0, maxTokens: 12, ignoreEos: true } },
  { prompt: [1, 9038, 2501], sampling: { temperature: 0.9, topP: 0.9, seed: 7, maxTokens: 12, ignoreEos: true } },
  {
    prompt: [1, 3118, 263, 931, 727, 471],
    sampling: { temperature: 0.7, topK: 20, repetitionPenalty: 1.2, seed: 11, maxTokens: 12, ignoreEos: true },
  },
];

let engine: LLMEngine;
let alone: Outcome[];
let tag = 0;

/** The engine's model runner and scheduler, to inject faults between the model and the sampler. */
function internals(e: LLMEngine): { runner: ModelRunner; lastPlan: () => SchedulerOutput | null } {
  const runner = Reflect.get(e, "runner") as ModelRunner;
  let last: SchedulerOutput | null = null;
  const schedule = e.scheduler.schedule.bind(e.scheduler);
  e.scheduler.schedule = () => {
    last = schedule();
    return last;
  };
  return { runner, lastPlan: () => last };
}

function submitNormal(e: LLMEngine): Promise<Outcome>[] {
  tag++;
  return normal.map((n, i) => run(e.submit({ requestId: `n${tag}-${i}`, ...n })));
}

beforeAll(async () => {
  const modelDir = await ensureDefaultModel("default", { quiet: true });
  engine = await LLMEngine.create({ modelDir, maxNumSeqs: 8, numThreads: 2 });
  alone = [];
  for (const p of submitNormal(engine)) alone.push(await p);
  // each alone, one at a time, must equal all three together (batching is exact); checked once here
  const seq: Outcome[] = [];
  for (const [i, n] of normal.entries()) seq.push(await run(engine.submit({ requestId: `seq${i}`, ...n })));
  expect(seq.map((o) => o.tokenIds)).toEqual(alone.map((o) => o.tokenIds));
});

/** Sampling values a hostile or careless client might send, finite and not. */
const wild = fc.oneof(
  fc.double(),
  fc.constantFrom(Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 1e-320, 5e-324, -0, 1e300, -1e300),
  // tiny divisors: what once overflowed float32 inside the sampler
  { arbitrary: fc.constantFrom(1e-320, 5e-324, 1e-300, 1e-40, 1e-3), weight: 3 },
  fc.integer({ min: -5, max: 5 }),
  fc.double({ min: 0, max: 2, noNaN: true }),
);

describe("hostile sampling parameters", () => {
  it("never change what the other requests in the same steps produce (property)", async () => {
    await fc.assert(
      fc.asyncProperty(
        // one or two parameters set to wild values, the rest left at their defaults
        fc
          .uniqueArray(
            fc.constantFrom(
              "temperature",
              "topP",
              "topK",
              "minP",
              "repetitionPenalty",
              "presencePenalty",
              "frequencyPenalty",
              "logitBias",
            ),
            { minLength: 1, maxLength: 2 },
          )
          .chain((keys) =>
            fc.tuple(
              ...keys.map((k) =>
                (k === "logitBias"
                  ? fc.dictionary(fc.integer({ min: 0, max: 31999 }).map(String), wild, { minKeys: 1, maxKeys: 4 })
                  : wild
                ).map((v) => [k, v] as const),
              ),
            ),
          )
          .map((entries) => Object.fromEntries(entries)),
        async (hostile) => {
          const others = submitNormal(engine);
          let hostileRun: Promise<Outcome> | null = null;
          try {
            hostileRun = run(
              engine.submit({
                requestId: `h${tag}`,
                prompt: [1, 887, 526],
                sampling: { ...(hostile as Partial<SamplingParams>), maxTokens: 12, ignoreEos: true },
              }),
            );
          } catch (e) {
            // refused up front, naming the parameter
            expect(e).toBeInstanceOf(SamplingParamError);
          }
          const results = await Promise.all(others);
          expect(results.map((o) => o.error)).toEqual([null, null, null]);
          expect(results.map((o) => o.tokenIds)).toEqual(alone.map((o) => o.tokenIds));
          if (hostileRun) {
            // admitted values are computable: the request completes normally
            const h = await hostileRun;
            expect(h.error).toBeNull();
            expect(h.tokenIds).toHaveLength(12);
          }
        },
      ),
      { numRuns: 40, seed: 20261201 },
    );
  });

  it.each([1e-320, 5e-324, 1e-300])("repetition_penalty %d is refused, naming the parameter", (rp) => {
    expect(() =>
      engine.submit({ requestId: `rp${rp}`, prompt: [1, 2], sampling: { repetitionPenalty: rp } }),
    ).toThrowError(expect.objectContaining({ name: "SamplingParamError", param: "repetition_penalty" }));
  });
});

describe("faults between the model and the sampler", () => {
  it("a NaN row in one sequence's logits ends that sequence alone with an error", async () => {
    const { runner, lastPlan } = internals(engine);
    const execute = runner.execute.bind(runner);
    const vocab = engine.cfg.vocabSize;
    let poisoned = 0;
    runner.execute = async (seqs, temps): Promise<StepOutput> => {
      const out = await execute(seqs, temps);
      // logits rows follow the plan's order over the sequences that sample this step
      let row = 0;
      for (const { request, numNewTokens } of lastPlan()?.scheduled ?? []) {
        if (request.numComputedTokens + numNewTokens !== request.numTokens) continue;
        if (request.requestId === "victim" && request.outputTokenIds.length === 4) {
          out.logits.fill(Number.NaN, row * vocab, (row + 1) * vocab);
          out.rowSums[row] = Number.NaN; // what the graph computes for such a row
          poisoned++;
        }
        row++;
      }
      return out;
    };
    try {
      const others = submitNormal(engine);
      const victim = await run(
        engine.submit({ requestId: "victim", prompt: [1, 887, 526], sampling: { ...normal[0].sampling } }),
      );
      const results = await Promise.all(others);
      expect(poisoned).toBe(1);
      expect(victim.error).toBeInstanceOf(EngineSequenceError);
      expect(victim.error?.message).toMatch(/non-finite logits/);
      expect(victim.tokenIds).toHaveLength(4); // what it had before the bad step
      expect(results.map((o) => o.error)).toEqual([null, null, null]);
      expect(results.map((o) => o.tokenIds)).toEqual(alone.map((o) => o.tokenIds));
    } finally {
      runner.execute = execute;
    }
    // the engine keeps serving, and the victim's blocks came back
    const again = await Promise.all(submitNormal(engine));
    expect(again.map((o) => o.tokenIds)).toEqual(alone.map((o) => o.tokenIds));
    expect(engine.stats().kvBlocksUsed).toBe(0);
  });

  it("a failed model run ends that step's requests retriably; queued requests and the next steps go on", async () => {
    const { runner } = internals(engine);
    const execute = runner.execute.bind(runner);
    let calls = 0;
    runner.execute = async (seqs, temps) => {
      if (++calls === 3) throw new Error("injected device failure");
      return execute(seqs, temps);
    };
    try {
      const failed = await Promise.all(submitNormal(engine));
      expect(failed.every((o) => o.error instanceof EngineStepError)).toBe(true);
      expect((failed[0].error as EngineStepError).code).toBe("unavailable");
      const after = await Promise.all(submitNormal(engine));
      expect(after.map((o) => o.tokenIds)).toEqual(alone.map((o) => o.tokenIds));
    } finally {
      runner.execute = execute;
    }
    expect(engine.stats().kvBlocksUsed).toBe(0);
  });
});
