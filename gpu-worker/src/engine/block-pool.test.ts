import { describe, expect, it } from "vitest";
import { BlockPool } from "./block-pool.ts";

const ids = (blocks: { id: number }[]) => blocks.map((b) => b.id);

describe("BlockPool", () => {
  it("starts with every block free, in id order", () => {
    const pool = new BlockPool(4, true);
    expect(pool.freeQueueIds()).toEqual([0, 1, 2, 3]);
    expect([pool.numFreeBlocks, pool.numUsedBlocks, pool.numCachedBlocks]).toEqual([4, 0, 0]);
    pool.checkInvariants();
  });

  it("allocates from the head of the free queue with refCount 1", () => {
    const pool = new BlockPool(4, true);
    const blocks = pool.allocate(3)!;
    expect(ids(blocks)).toEqual([0, 1, 2]);
    expect(blocks.map((b) => b.refCount)).toEqual([1, 1, 1]);
    expect([pool.numFreeBlocks, pool.numUsedBlocks]).toEqual([1, 3]);
    pool.checkInvariants();
  });

  it("returns null and changes nothing when blocks are short", () => {
    const pool = new BlockPool(4, true);
    pool.allocate(3);
    expect(pool.allocate(2)).toBeNull();
    expect(pool.freeQueueIds()).toEqual([3]);
    expect(ids(pool.allocate(1)!)).toEqual([3]);
    expect(pool.allocate(1)).toBeNull();
    expect(ids(pool.allocate(0)!)).toEqual([]);
  });

  it("appends freed blocks to the tail in the order given (LRU)", () => {
    const pool = new BlockPool(5, true);
    const [a, b, c] = pool.allocate(3)!;
    pool.free([c, b, a]); // a request's blocks, tail first
    expect(pool.freeQueueIds()).toEqual([3, 4, 2, 1, 0]);
    expect(ids(pool.allocate(5)!)).toEqual([3, 4, 2, 1, 0]);
    pool.checkInvariants();
  });

  it("keeps freed cached blocks findable until they are evicted, least recently freed first", () => {
    const pool = new BlockPool(4, true);
    const [a, b, c, d] = pool.allocate(4)!;
    pool.cacheFullBlock(a, "h0");
    pool.cacheFullBlock(b, "h1");
    pool.cacheFullBlock(c, "h2");
    expect(pool.numCachedBlocks).toBe(0); // cached but in use
    pool.free([c, b, a]);
    expect(pool.numCachedBlocks).toBe(3);
    expect(pool.getCachedBlock("h1")).toBe(b);
    pool.free([d]);
    expect(pool.freeQueueIds()).toEqual([2, 1, 0, 3]);

    // Popping a cached block evicts its hash.
    expect(ids(pool.allocate(1)!)).toEqual([2]);
    expect(pool.getCachedBlock("h2")).toBeNull();
    expect(c.hash).toBeNull();
    expect(pool.getCachedBlock("h0")).toBe(a);
    expect(pool.numCachedBlocks).toBe(2);
    pool.checkInvariants();
  });

  it("touch takes a free cached block out of the middle of the queue", () => {
    const pool = new BlockPool(4, true);
    const blocks = pool.allocate(4)!;
    pool.cacheFullBlock(blocks[1], "h1");
    pool.free(blocks);
    expect(pool.numCachedBlocks).toBe(1);
    const hit = pool.getCachedBlock("h1")!;
    pool.touch([hit]);
    expect(hit.refCount).toBe(1);
    expect(pool.freeQueueIds()).toEqual([0, 2, 3]);
    expect([pool.numFreeBlocks, pool.numCachedBlocks]).toEqual([3, 0]);
    pool.touch([hit]); // a second sharer: no queue change
    expect(hit.refCount).toBe(2);
    pool.free([hit]);
    pool.free([hit]);
    expect(pool.freeQueueIds()).toEqual([0, 2, 3, 1]); // back at the tail: most recently used
    expect(pool.getCachedBlock("h1")).toBe(hit);
    pool.checkInvariants();
  });

  it("keeps one block per hash: a duplicate stays uncached", () => {
    const pool = new BlockPool(3, true);
    const [a, b] = pool.allocate(2)!;
    pool.cacheFullBlock(a, "same");
    pool.cacheFullBlock(b, "same");
    expect(pool.getCachedBlock("same")).toBe(a);
    expect(b.hash).toBeNull();
    pool.cacheFullBlock(a, "same"); // idempotent
    expect(() => pool.cacheFullBlock(a, "other")).toThrow(/block 0/);
    pool.checkInvariants();
  });

  it("caches nothing when caching is off", () => {
    const pool = new BlockPool(2, false);
    const [a] = pool.allocate(1)!;
    pool.cacheFullBlock(a, "h");
    expect(pool.getCachedBlock("h")).toBeNull();
    expect(a.hash).toBeNull();
    pool.checkInvariants();
  });

  it("rejects a double free, naming the block", () => {
    const pool = new BlockPool(2, true);
    const [a] = pool.allocate(1)!;
    pool.free([a]);
    expect(() => pool.free([a])).toThrow(/block 0 .*double free/);
  });

  it("checkInvariants names the block whose bookkeeping is broken", () => {
    const pool = new BlockPool(4, true);
    const [a, b] = pool.allocate(2)!;
    b.refCount = 0; // freed behind the pool's back
    expect(() => pool.checkInvariants()).toThrow(/block 1 /);
    b.refCount = 1;
    a.hash = "stale"; // hash set without the map
    expect(() => pool.checkInvariants()).toThrow(/block 0 /);
    a.hash = null;
    pool.checkInvariants();
  });
});
