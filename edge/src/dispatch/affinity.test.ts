import type { LoadReport } from "@llama-edge/shared";
import { describe, expect, it } from "vitest";
import { PrefixRouter, prefixKeys, WorkerTable, workerBlockHashes } from "./affinity.ts";

const report = (worker_id: string, over: Partial<LoadReport> = {}): LoadReport => ({
  v: 1,
  worker_id,
  pool: "p",
  model: "m",
  ts: 0,
  running: 0,
  waiting: 0,
  max_num_seqs: 4,
  kv_blocks_total: 100,
  kv_blocks_free: 100,
  kv_usage: 0,
  prefix_cache: { block_size: 16, hit_rate: 0, block_hashes: [] },
  tokens_per_second: 0,
  draining: false,
  ...over,
});

const chat = (...contents: string[]) => ({
  type: "chat" as const,
  messages: contents.map((content, i) => ({ role: i === 0 ? ("system" as const) : ("user" as const), content })),
});

describe("prefixKeys", () => {
  it("gives prompts sharing leading messages the same leading keys", () => {
    const a = prefixKeys(chat("You are terse.", "Hi"));
    const b = prefixKeys(chat("You are terse.", "Bye"));
    const c = prefixKeys(chat("You are verbose.", "Hi"));
    expect(a).toHaveLength(2);
    expect(a[0]).toBe(b[0]);
    expect(a[1]).not.toBe(b[1]);
    expect(c[0]).not.toBe(a[0]);
  });

  it("chunks text and token prompts", () => {
    const long = "x".repeat(300);
    expect(prefixKeys({ type: "text", text: long })).toHaveLength(2);
    expect(prefixKeys({ type: "text", text: `${long}y` })[1]).toBe(prefixKeys({ type: "text", text: long })[1]);
    expect(prefixKeys({ type: "tokens", token_ids: Array(40).fill(3) })).toHaveLength(2);
  });
});

describe("workerBlockHashes", () => {
  it("computes the worker's prefix-cache block hashes", async () => {
    // Vector from gpu-worker/src/engine/kv-cache-manager.ts hashBlockTokens (Node crypto).
    const ids = Array.from({ length: 40 }, (_, i) => i * 7 + 1);
    expect(await workerBlockHashes(ids, 16)).toEqual(["TIXFP8-beyhae42km9TvAB", "jVSmI9G-PV-x1m8h0_cQcu"]);
    // The last token is always recomputed, so 32 tokens make one full cacheable block.
    expect(await workerBlockHashes(ids.slice(0, 32), 16)).toHaveLength(1);
  });
});

describe("WorkerTable", () => {
  it("forgets silent workers and sees saturation", () => {
    let now = 0;
    const table = new WorkerTable({ now: () => now, staleMs: 1000 });
    table.update(report("a", { running: 4 }));
    table.update(report("b", { kv_blocks_free: 2 }));
    table.update(report("c", { draining: true }));
    table.update(report("d"));
    expect(
      table
        .inPool("p")
        .filter((w) => table.hasRoom(w))
        .map((w) => w.report.worker_id),
    ).toEqual(["d"]);
    now = 1001;
    expect(table.inPool("p")).toEqual([]);
  });
});

describe("PrefixRouter", () => {
  it("routes a shared system prompt to the worker that started it, unless it is full", async () => {
    const table = new WorkerTable();
    const router = new PrefixRouter(table);
    table.update(report("a"));
    table.update(report("b"));
    const first = chat("Shared system prompt", "Q1");
    expect(await router.pick("p", first, prefixKeys(first))).toBeUndefined();
    router.learn("p", prefixKeys(first), "b");
    const second = chat("Shared system prompt", "Q2");
    const hit = await router.pick("p", second, prefixKeys(second));
    expect(hit?.worker.report.worker_id).toBe("b");
    expect(hit?.depth).toBe(1);
    expect(await router.pick("other-pool", second, prefixKeys(second))).toBeUndefined();
    table.update(report("b", { running: 2, waiting: 2 }));
    expect(await router.pick("p", second, prefixKeys(second))).toBeUndefined();
  });

  it("matches token prompts against the block hashes workers report", async () => {
    const table = new WorkerTable();
    const router = new PrefixRouter(table);
    const ids = Array.from({ length: 40 }, (_, i) => i * 7 + 1);
    const [h1, h2] = await workerBlockHashes(ids, 16);
    table.update(report("a", { prefix_cache: { block_size: 16, hit_rate: 0, block_hashes: [h1!] } }));
    table.update(report("b", { prefix_cache: { block_size: 16, hit_rate: 0, block_hashes: [h2!] } }));
    const prompt = { type: "tokens" as const, token_ids: ids };
    const hit = await router.pick("p", prompt, prefixKeys(prompt));
    expect(hit?.worker.report.worker_id).toBe("b");
    expect(hit?.depth).toBe(2);
  });
});

describe("ShardedJobRunner.shardFor", () => {
  it("sends prompts sharing a system prompt to the same shard", async () => {
    const { ShardedJobRunner } = await import("../durable/dispatch-shard.ts");
    const runner = new ShardedJobRunner({} as never, 8, {} as never);
    const job = (system: string, user: string) =>
      ({ prompts: [chat(system, user)] }) as unknown as Parameters<typeof runner.shardFor>[0];
    const shards = new Set(["a", "b", "c", "d", "e"].map((u) => runner.shardFor(job("Shared system prompt", u))));
    expect(shards.size).toBe(1);
    const spread = new Set(Array.from({ length: 40 }, (_, i) => runner.shardFor(job(`system ${i}`, "q"))));
    expect(spread.size).toBeGreaterThan(4);
  });
});
