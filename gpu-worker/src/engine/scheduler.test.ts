import { describe, expect, it } from "vitest";
import { KVCacheManager } from "./kv-cache-manager.ts";
import { Request, RequestStatus } from "./request.ts";
import { validateSamplingParams } from "./sampling-params.ts";
import { Scheduler, type SchedulerOutput } from "./scheduler.ts";

const params = validateSamplingParams({}, { vocabSize: 1000 });

/** A scheduler over a real KV cache manager, stepped without a model: each scheduled chunk is "computed". */
function setup(opts: { numBlocks?: number; budget?: number; maxNumSeqs?: number; prefixCaching?: boolean } = {}) {
  const kv = new KVCacheManager({
    numBlocks: opts.numBlocks ?? 64,
    blockSize: 4,
    enablePrefixCaching: opts.prefixCaching ?? false,
  });
  const scheduler = new Scheduler({ maxNumSeqs: opts.maxNumSeqs ?? 8, maxNumBatchedTokens: opts.budget ?? 8 }, kv);
  let arrival = 0;
  const add = (id: string, promptLen: number, maxTokens = 100, first = 10) => {
    const prompt = Array.from({ length: promptLen }, (_, i) => first + i);
    const r = new Request(id, prompt, params, null, promptLen + maxTokens, arrival++);
    scheduler.add(r);
    return r;
  };
  const step = (): SchedulerOutput => {
    const out = scheduler.schedule();
    for (const { request, numNewTokens } of out.scheduled) {
      request.numComputedTokens += numNewTokens;
      kv.cacheFullBlocks(request.requestId, request.tokenIds, request.numComputedTokens);
      if (request.numComputedTokens === request.numTokens) request.appendOutput(7);
    }
    return out;
  };
  const plan = (out: SchedulerOutput) => out.scheduled.map((s) => [s.request.requestId, s.numNewTokens]);
  return { kv, scheduler, add, step, plan };
}

describe("Scheduler", () => {
  it("splits a long prompt into chunks within the token budget, then decodes one token a step", () => {
    const { add, step, plan } = setup({ budget: 8 });
    add("a", 20);
    expect([step(), step(), step(), step()].map(plan)).toEqual([[["a", 8]], [["a", 8]], [["a", 4]], [["a", 1]]]);
  });

  it("never stalls a decoding stream behind another request's prefill chunks", () => {
    const { add, step, plan } = setup({ budget: 8 });
    add("b", 3);
    step(); // b prefilled, now decoding
    add("a", 40);
    for (let i = 0; i < 6; i++) {
      const p = plan(step());
      expect(p[0]).toEqual(["b", 1]); // b first, one token, every step
      expect(p.reduce((n, [, k]) => n + (k as number), 0)).toBeLessThanOrEqual(8);
    }
  });

  it("admits waiting requests first come, first served: nobody overtakes a head that does not fit", () => {
    // 6 blocks of 4 tokens: the 30-token head needs 8, the small one behind it would fit
    const { add, step, plan, scheduler } = setup({ numBlocks: 6, budget: 64 });
    add("big", 30);
    add("small", 2);
    expect(plan(step())).toEqual([]);
    expect(scheduler.waiting.map((r) => r.requestId)).toEqual(["big", "small"]);
  });

  it("preempts the most recently admitted request when blocks run out, and loses none of its tokens", () => {
    // 4 blocks of 4 tokens; two requests of 6 prompt tokens grow until they no longer both fit
    const { add, step, scheduler, kv } = setup({ numBlocks: 4, budget: 64 });
    const first = add("first", 6);
    const second = add("second", 6);
    let out = step();
    while (out.preempted.length === 0) out = step();
    expect(out.preempted.map((r) => r.requestId)).toEqual(["second"]);
    expect(second.status).toBe(RequestStatus.PREEMPTED);
    expect(second.numComputedTokens).toBe(0);
    expect(scheduler.waiting[0]).toBe(second);
    const outputSoFar = [...second.outputTokenIds];
    // it resumes once the first finishes, recomputing prompt + output
    scheduler.finish(first, RequestStatus.FINISHED_LENGTH);
    const resumed = step();
    expect(resumed.scheduled.map((s) => [s.request.requestId, s.numNewTokens])).toEqual([
      ["second", 6 + outputSoFar.length],
    ]);
    expect(second.outputTokenIds.slice(0, outputSoFar.length)).toEqual(outputSoFar);
    kv.checkInvariants();
  });

  it("frees an aborted request's blocks at once", () => {
    const { add, step, scheduler, kv } = setup();
    const r = add("r", 10);
    step();
    expect(kv.stats().used).toBeGreaterThan(0);
    scheduler.finish(r, RequestStatus.FINISHED_ABORTED);
    expect(kv.stats().used).toBe(0);
    expect(scheduler.hasUnfinished).toBe(false);
  });

  it("reports cached tokens from the admission that succeeds, not from an attempt that could not allocate", () => {
    const { add, step, scheduler } = setup({ numBlocks: 6, budget: 64, prefixCaching: true });
    const a = add("a", 8, 1);
    step();
    scheduler.finish(a, RequestStatus.FINISHED_STOPPED); // its 2 full blocks stay cached
    const hog = add("hog", 16, 100, 500);
    step(); // hog holds the 4 uncached blocks
    const b = add("b", 20, 1); // starts with a's 8 tokens: a 2-block hit, but 3 more blocks do not fit
    step();
    expect(b.status).toBe(RequestStatus.WAITING);
    for (let i = 0; i < 4; i++) step(); // hog grows into a 5th block, evicting a's cached blocks (LRU)
    scheduler.finish(hog, RequestStatus.FINISHED_STOPPED);
    const out = step();
    const admitted = out.scheduled.find((s) => s.request === b);
    expect(admitted).toBeDefined();
    // what was actually served from the cache at admission: the computed tokens before this step's chunk
    const cachedAtAdmission = b.numComputedTokens - (admitted?.numNewTokens ?? 0);
    expect(cachedAtAdmission).toBeLessThan(8); // the failed attempt saw 8
    expect(b.numCachedTokens).toBe(cachedAtAdmission);
  });
});
