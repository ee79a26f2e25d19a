/**
 * The serving engine end to end on real ONNX Runtime: continuous batching, chunked prefill, preemption,
 * prefix caching, aborts and seeded sampling must never change what any single request produces.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type EngineOptions, EngineRequestError, LLMEngine } from "../src/engine/llm-engine.ts";
import { ModelRunner } from "../src/engine/model-runner.ts";
import { SamplingParamError } from "../src/engine/sampling-params.ts";
import type { EngineEvent, FinishReason, SamplingParams } from "../src/engine/types.ts";
import { loadLlamaConfig } from "../src/model/config.ts";
import { ensureDefaultModel } from "../src/model/default-model.ts";
import { writeRandomLlama } from "../src/model/random-model.ts";

interface Result {
  tokenIds: number[];
  text: string;
  finishReason: FinishReason | null;
  cachedTokens: number;
  deltas: string[];
}

async function collect(stream: AsyncIterable<EngineEvent>): Promise<Result> {
  const r: Result = { tokenIds: [], text: "", finishReason: null, cachedTokens: 0, deltas: [] };
  for await (const e of stream) {
    if (e.type === "delta") {
      r.tokenIds.push(...e.tokenIds);
      r.text += e.text;
      r.deltas.push(e.text);
    } else {
      r.finishReason = e.finishReason;
      r.cachedTokens = e.usage.cachedTokens;
    }
  }
  return r;
}

const greedy = (maxTokens: number): Partial<SamplingParams> => ({ temperature: 0, maxTokens, ignoreEos: true });

/** Prompts of different lengths (token ids), some longer than one block. */
function prompts(n: number): number[][] {
  return Array.from({ length: n }, (_, i) => {
    const len = 3 + ((i * 11) % 40);
    return [1, ...Array.from({ length: len - 1 }, (_, j) => 100 + ((i * 131 + j * 17) % 20000))];
  });
}

let modelDir: string;
let kvBytesPerBlock: number;
const engines: LLMEngine[] = [];
async function engine(opts: Partial<EngineOptions> = {}): Promise<LLMEngine> {
  const e = await LLMEngine.create({ modelDir, ...opts });
  engines.push(e);
  return e;
}

beforeAll(async () => {
  modelDir = await ensureDefaultModel("default", { quiet: true });
  kvBytesPerBlock = ModelRunner.kvBytesPerToken(loadLlamaConfig(modelDir)) * 16;
});

describe("continuous batching", () => {
  let alone: Result[];
  const ps = prompts(12);
  beforeAll(async () => {
    const e = await engine({ maxNumSeqs: 1 });
    alone = [];
    for (const [i, p] of ps.entries())
      alone.push(await collect(e.submit({ requestId: `a${i}`, prompt: p, sampling: greedy(24) })));
  });

  it("N concurrent greedy requests produce exactly the tokens each produces alone", async () => {
    const e = await engine({ maxNumSeqs: 16 });
    const together = await Promise.all(
      ps.map((p, i) => collect(e.submit({ requestId: `c${i}`, prompt: p, sampling: greedy(24) }))),
    );
    expect(together.map((r) => r.tokenIds)).toEqual(alone.map((r) => r.tokenIds));
    expect(together.map((r) => r.text)).toEqual(alone.map((r) => r.text));
  });

  it("chunked prefill forced by a tiny token budget changes nothing", async () => {
    const e = await engine({ maxNumSeqs: 16, maxNumBatchedTokens: 7 });
    const together = await Promise.all(
      ps.map((p, i) => collect(e.submit({ requestId: `k${i}`, prompt: p, sampling: greedy(24) }))),
    );
    expect(together.map((r) => r.tokenIds)).toEqual(alone.map((r) => r.tokenIds));
  });

  it("preemption forced by a tiny pool loses, duplicates and changes no token", async () => {
    // 12 blocks of 16 tokens for 12 sequences of up to 66 tokens: most must be preempted and recomputed.
    const e = await engine({ maxNumSeqs: 16, kvCacheBytes: 12 * kvBytesPerBlock, enablePrefixCaching: false });
    const together = await Promise.all(
      ps.map((p, i) => collect(e.submit({ requestId: `p${i}`, prompt: p, sampling: greedy(24) }))),
    );
    expect(e.stats().preempted).toBeGreaterThan(0);
    expect(together.map((r) => r.tokenIds)).toEqual(alone.map((r) => r.tokenIds));
    expect(together.map((r) => r.text)).toEqual(alone.map((r) => r.text));
    expect(e.stats().kvBlocksUsed).toBe(0);
  });

  it("a request joins a running batch between steps and leaves at once when done", async () => {
    const e = await engine({ maxNumSeqs: 8 });
    const long = collect(e.submit({ requestId: "long", prompt: ps[0], sampling: greedy(40) }));
    await new Promise((r) => setTimeout(r, 20));
    const short = await collect(e.submit({ requestId: "short", prompt: ps[1], sampling: greedy(3) }));
    expect(e.stats().running).toBe(1); // the short one left while the long one still runs
    expect(short.tokenIds).toEqual(alone[1].tokenIds.slice(0, 3));
    expect((await long).tokenIds).toEqual(
      (await collect((await engine({ maxNumSeqs: 1 })).submit({ requestId: "l", prompt: ps[0], sampling: greedy(40) })))
        .tokenIds,
    );
  });
});

describe("KV pool size", () => {
  it("a pool larger than one typed array can hold (17 GiB, > 2^32 floats) serves the same tokens", async () => {
    // Pages are only touched where blocks are written, so this allocates virtual memory, not 17 GiB.
    const big = await engine({ maxNumSeqs: 2, kvCacheBytes: 17 * 1024 ** 3 });
    expect(big.config.numBlocks * kvBytesPerBlock).toBeGreaterThan(4 * 2 ** 32);
    const small = await engine({ maxNumSeqs: 2 });
    const p = prompts(2)[1];
    const a = await collect(big.submit({ requestId: "big", prompt: p, sampling: greedy(8) }));
    const b = await collect(small.submit({ requestId: "small", prompt: p, sampling: greedy(8) }));
    expect(a.tokenIds).toEqual(b.tokenIds);
  });
});

describe("prefix caching", () => {
  it("a prefix-cache hit changes no output and skips the cached prefill", async () => {
    const e = await engine({ maxNumSeqs: 4 });
    const shared = [1, ...Array.from({ length: 70 }, (_, j) => 500 + j)];
    const a = await collect(e.submit({ requestId: "x1", prompt: [...shared, 42, 43], sampling: greedy(10) }));
    expect(a.cachedTokens).toBe(0);
    const b = await collect(e.submit({ requestId: "x2", prompt: [...shared, 42, 43], sampling: greedy(10) }));
    // 73 tokens: 4 full blocks (64 tokens) come from the cache; the last prompt token is always recomputed
    expect(b.cachedTokens).toBe(64);
    expect(b.tokenIds).toEqual(a.tokenIds);
    const c = await collect(e.submit({ requestId: "x3", prompt: [...shared, 7], sampling: greedy(10) }));
    expect(c.cachedTokens).toBe(64);
    const fresh = await engine({ maxNumSeqs: 4, enablePrefixCaching: false });
    const cAlone = await collect(fresh.submit({ requestId: "x4", prompt: [...shared, 7], sampling: greedy(10) }));
    expect(cAlone.cachedTokens).toBe(0);
    expect(c.tokenIds).toEqual(cAlone.tokenIds);
    expect(e.stats().prefixCacheHitRate).toBeGreaterThan(0);
  });
});

describe("aborts and leaks", () => {
  let tinyDir: string;
  beforeAll(() => {
    tinyDir = mkdtempSync(join(tmpdir(), "llama-tiny-"));
    writeRandomLlama(tinyDir, {
      seed: 3,
      tokenizer: "llama2",
      config: {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        max_position_embeddings: 128,
        vocab_size: 32000,
      },
    });
  });
  afterAll(() => rmSync(tinyDir, { recursive: true, force: true }));

  it("abort mid-stream frees the sequence's blocks before the next step", async () => {
    const e = await engine({ maxNumSeqs: 4 });
    const it = e.submit({ requestId: "ab", prompt: prompts(1)[0], sampling: greedy(100) })[Symbol.asyncIterator]();
    await it.next();
    await it.next();
    expect(e.stats().kvBlocksUsed).toBeGreaterThan(0);
    e.abort("ab");
    expect(e.stats().kvBlocksUsed).toBe(0);
    const rest: EngineEvent[] = [];
    for (let r = await it.next(); !r.done; r = await it.next()) rest.push(r.value);
    expect(rest.at(-1)).toMatchObject({ type: "final", finishReason: "abort" });
  });

  it("1000 randomized requests with random aborts: no leaked block, no hung request", async () => {
    const perBlock = ModelRunner.kvBytesPerToken(loadLlamaConfig(tinyDir)) * 16;
    // 24 blocks for up to 32 sequences of up to 90 tokens: admission waits, preemption and aborts all happen
    const e = await LLMEngine.create({
      modelDir: tinyDir,
      maxNumSeqs: 32,
      maxNumBatchedTokens: 64,
      kvCacheBytes: 24 * perBlock,
    });
    let seed = 42;
    const rand = (n: number) => {
      // mulberry32: an LCG's low bits would repeat with a short period
      seed = (seed + 0x6d2b79f5) | 0;
      let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) % n;
    };
    const outcomes = { finished: 0, returned: 0, aborted: 0 };
    const tasks: Promise<void>[] = [];
    for (let i = 0; i < 1000; i++) {
      const prompt = [1, ...Array.from({ length: rand(60) }, () => 3 + rand(31000))];
      const stream = e.submit({
        requestId: `r${i}`,
        prompt,
        sampling: { temperature: 1, seed: i, maxTokens: 1 + rand(30), ignoreEos: rand(2) === 0 },
      });
      const mode = rand(10);
      const stopAfter = rand(8);
      tasks.push(
        (async () => {
          let n = 0;
          for await (const ev of stream) {
            if (ev.type === "final") {
              if (ev.finishReason === "abort") outcomes.aborted++;
              else outcomes.finished++;
              break;
            }
            if (mode === 0 && ++n > stopAfter) {
              outcomes.returned++; // client went away: leaving the loop aborts the request
              break;
            }
            if (mode === 1 && ++n > stopAfter) e.abort(`r${i}`);
          }
        })(),
      );
      if (i % 25 === 0) await new Promise((r) => setTimeout(r, 1));
    }
    await Promise.all(tasks);
    expect(outcomes.finished + outcomes.returned + outcomes.aborted).toBe(1000);
    expect(outcomes.returned).toBeGreaterThan(0);
    expect(outcomes.aborted).toBeGreaterThan(0);
    const stats = e.stats();
    expect(stats.running + stats.waiting).toBe(0);
    expect(stats.kvBlocksUsed).toBe(0);
    expect(stats.kvBlocksFree).toBe(stats.kvBlocksTotal);
    e.kv.checkInvariants();
  }, 300_000);
});

describe("sampling", () => {
  it("seeded sampling is reproducible across batch compositions", async () => {
    const sampling: Partial<SamplingParams> = {
      temperature: 0.9,
      topP: 0.95,
      topK: 50,
      seed: 1234,
      maxTokens: 20,
      ignoreEos: true,
    };
    const e1 = await engine({ maxNumSeqs: 1 });
    const alone = await collect(e1.submit({ requestId: "s", prompt: prompts(3)[2], sampling }));
    const e2 = await engine({ maxNumSeqs: 8 });
    const others = prompts(6).map((p, i) =>
      collect(
        e2.submit({
          requestId: `o${i}`,
          prompt: p,
          sampling: { temperature: 1, seed: i, maxTokens: 5 + i * 3, ignoreEos: true },
        }),
      ),
    );
    const mixed = await collect(e2.submit({ requestId: "s", prompt: prompts(3)[2], sampling }));
    await Promise.all(others);
    expect(mixed.tokenIds).toEqual(alone.tokenIds);
    // and a different seed gives a different continuation
    const other = await collect(
      e1.submit({ requestId: "s2", prompt: prompts(3)[2], sampling: { ...sampling, seed: 99 } }),
    );
    expect(other.tokenIds).not.toEqual(alone.tokenIds);
  });

  it("stop strings split across tokens end generation and are not emitted", async () => {
    const e = await engine({ maxNumSeqs: 2 });
    const base = await collect(e.submit({ requestId: "b", prompt: prompts(1)[0], sampling: greedy(30) }));
    // pick a stop string that starts inside one token's text and ends inside a later one
    const text = base.text;
    const cut = base.deltas[0].length + base.deltas[1].length - 1;
    const stop = text.slice(cut, cut + 4);
    expect(stop.length).toBe(4);
    const r = await collect(
      e.submit({ requestId: "st", prompt: prompts(1)[0], sampling: { ...greedy(30), stop: [stop] } }),
    );
    expect(r.finishReason).toBe("stop");
    expect(r.text).toBe(text.slice(0, text.indexOf(stop)));
    expect(r.text).not.toContain(stop);
  });

  it("text held back for a stop string is released when generation ends on EOS or a stop token", async () => {
    // The default model's weights with eos set to a token greedy decoding produces: a real EOS, no ignore_eos.
    const base = await collect(
      (await engine({ maxNumSeqs: 2 })).submit({ requestId: "b", prompt: prompts(1)[0], sampling: greedy(30) }),
    );
    const k = base.deltas.findIndex(
      (d, i) => i >= 3 && d.length > 0 && !base.tokenIds.slice(0, i).includes(base.tokenIds[i]),
    );
    expect(k).toBeGreaterThan(2);
    const before = base.deltas.slice(0, k).join("");
    // a stop string that begins with the text's last character, so the checker holds that character back
    const stop = `${before.slice(-1)}\u0007never`;
    const eosDir = mkdtempSync(join(tmpdir(), "llama-eos-"));
    try {
      for (const f of readdirSync(modelDir)) {
        if (f !== "config.json" && f !== "generation_config.json") symlinkSync(join(modelDir, f), join(eosDir, f));
      }
      const config = JSON.parse(readFileSync(join(modelDir, "config.json"), "utf8"));
      writeFileSync(join(eosDir, "config.json"), JSON.stringify({ ...config, eos_token_id: base.tokenIds[k] }));
      const e = await engine({ modelDir: eosDir, maxNumSeqs: 2 });
      const sampling = { temperature: 0, maxTokens: 30, stop: [stop] };
      const r = await collect(e.submit({ requestId: "eos", prompt: prompts(1)[0], sampling }));
      expect(r.finishReason).toBe("stop");
      expect(r.tokenIds).toEqual(base.tokenIds.slice(0, k + 1)); // the EOS token is the last one
      expect(r.text).toBe(before);
      // a stop token id takes the same path
      const e2 = await engine({ maxNumSeqs: 2 });
      const viaId = await collect(
        e2.submit({
          requestId: "sid",
          prompt: prompts(1)[0],
          sampling: { ...sampling, stopTokenIds: [base.tokenIds[k]] },
        }),
      );
      expect(viaId.text).toBe(before);
    } finally {
      rmSync(eosDir, { recursive: true, force: true });
    }
  });

  it("invalid values are rejected with an error naming the parameter", async () => {
    const e = await engine({ maxNumSeqs: 2 });
    expect(() => e.submit({ requestId: "v", prompt: "hi", sampling: { topP: 0 } })).toThrow(SamplingParamError);
    expect(() => e.submit({ requestId: "v", prompt: "hi", sampling: { temperature: -1 } })).toThrow(/temperature/);
    const long = Array.from({ length: 300 }, () => 100);
    expect(() => e.submit({ requestId: "v", prompt: long })).toThrow(EngineRequestError);
  });
});
