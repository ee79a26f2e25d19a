import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { hashBlockTokens, KVCacheManager } from "./kv-cache-manager.ts";

const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);

function manager(numBlocks: number, blockSize = 4, enablePrefixCaching = true) {
  return new KVCacheManager({ numBlocks, blockSize, enablePrefixCaching });
}

/** Admits a request the way the scheduler does: prefix lookup, then the first allocation, then caching. */
function admit(kv: KVCacheManager, id: string, tokens: number[]) {
  const computed = kv.getComputedBlocks(tokens);
  const alloc = kv.allocateSlots(id, tokens.length, computed.numCachedTokens, computed);
  if (alloc !== null) kv.cacheFullBlocks(id, tokens, tokens.length);
  return { computed, alloc };
}

describe("KVCacheManager", () => {
  it("blocksForTokens rounds up", () => {
    expect([0, 1, 4, 5, 8].map((n) => KVCacheManager.blocksForTokens(n, 4))).toEqual([0, 1, 1, 2, 2]);
  });

  it("grows a block table step by step and frees it", () => {
    const kv = manager(8);
    expect(kv.allocateSlots("a", 3, 0)).toEqual({ blockTable: [0], copies: [] });
    expect(kv.allocateSlots("a", 4, 0)).toEqual({ blockTable: [0], copies: [] });
    expect(kv.allocateSlots("a", 9, 0)).toEqual({ blockTable: [0, 1, 2], copies: [] });
    expect(kv.blockTable("a")).toEqual([0, 1, 2]);
    expect(kv.stats()).toMatchObject({ total: 8, used: 3, free: 5 });
    kv.checkInvariants();
    kv.free("a");
    expect(kv.blockTable("a")).toEqual([]);
    expect(kv.stats()).toMatchObject({ used: 0, free: 8 });
    kv.checkInvariants();
  });

  it("gives a second request with a shared prefix the same physical blocks", () => {
    const kv = manager(16);
    const shared = range(100, 108); // two full blocks
    const a = admit(kv, "a", [...shared, 1, 2]);
    expect(a.computed.numCachedTokens).toBe(0);
    const b = admit(kv, "b", [...shared, 7, 8, 9]);
    expect(b.computed.numCachedTokens).toBe(8);
    expect(b.computed.blockIds).toEqual(a.alloc!.blockTable.slice(0, 2));
    expect(b.alloc!.blockTable.slice(0, 2)).toEqual(a.alloc!.blockTable.slice(0, 2));
    expect(b.alloc!.blockTable[2]).not.toBe(a.alloc!.blockTable[2]);
    expect(kv.stats().hitRate).toBeCloseTo(8 / (10 + 11));
    kv.checkInvariants();
  });

  it("counts a lookup toward the hit rate only when its allocation succeeds", () => {
    const kv = manager(4);
    admit(kv, "a", range(0, 9)); // 0 of 9 hit
    kv.free("a");
    const prompt = [...range(0, 8), ...range(20, 30)]; // 18 tokens: 8 hit, 5 blocks needed, 4 exist
    expect(admit(kv, "b", prompt).alloc).toBeNull();
    expect(admit(kv, "b", prompt).alloc).toBeNull();
    expect(kv.stats().hitRate).toBe(0);
    expect(admit(kv, "c", prompt.slice(0, 16)).alloc).not.toBeNull();
    expect(kv.stats().hitRate).toBeCloseTo(8 / (9 + 16));
  });

  it("always leaves the last prompt token to compute", () => {
    const kv = manager(16);
    const prompt = range(0, 12); // three full blocks
    admit(kv, "a", prompt);
    expect(kv.getComputedBlocks(prompt).numCachedTokens).toBe(8); // capped at 11, rounded down to blocks
    expect(kv.getComputedBlocks(range(0, 13)).numCachedTokens).toBe(12);
    expect(kv.getComputedBlocks(range(0, 9)).numCachedTokens).toBe(8);
    expect(kv.getComputedBlocks(range(0, 8)).numCachedTokens).toBe(4);
    expect(kv.getComputedBlocks([0]).numCachedTokens).toBe(0);
  });

  it("hits only a matching chain: a different first block means no hit at all", () => {
    const kv = manager(16);
    admit(kv, "a", range(0, 9));
    expect(kv.getComputedBlocks([99, ...range(1, 9)]).numCachedTokens).toBe(0);
    // Same second block content under a different parent does not hit either.
    expect(kv.getComputedBlocks([...range(50, 54), ...range(4, 9)]).numCachedTokens).toBe(0);
  });

  it("finds freed requests' blocks while they are not yet evicted, and evicts a freed request's tail first", () => {
    const kv = manager(4, 1); // blockSize 1 makes the queue order visible
    admit(kv, "a", [10, 11, 12]); // blocks 0,1,2; 10 and 11 cached (12 is not computed... it is: all 3 cached)
    kv.free("a"); // queue: 3, 2, 1, 0
    expect(kv.stats()).toMatchObject({ free: 4, used: 0, cached: 3 });
    // Two new blocks: takes block 3 (never used) and block 2 (a's tail).
    expect(kv.allocateSlots("x", 2, 0)!.blockTable).toEqual([3, 2]);
    expect(kv.getComputedBlocks([10, 11, 12]).blockIds).toEqual([0, 1]);
    const b = admit(kv, "b", [10, 11, 99]);
    expect(b.computed.blockIds).toEqual([0, 1]);
    expect(b.alloc).toBeNull(); // 0 and 1 are free but adopting them leaves nothing for the third token
    expect(kv.stats()).toMatchObject({ free: 2, cached: 2 });
    kv.free("x");
    expect(admit(kv, "b", [10, 11, 99]).alloc!.blockTable).toEqual([0, 1, 2]);
    kv.checkInvariants();
  });

  it("allocation is all-or-nothing", () => {
    const kv = manager(4);
    kv.allocateSlots("a", 12, 0); // 3 blocks
    expect(kv.allocateSlots("b", 5, 0)).toBeNull();
    expect(kv.blockTable("b")).toEqual([]);
    expect(kv.allocateSlots("a", 17, 0)).toBeNull();
    expect(kv.blockTable("a")).toEqual([0, 1, 2]);
    expect(kv.stats()).toMatchObject({ used: 3, free: 1 });
    kv.checkInvariants();
    expect(kv.allocateSlots("a", 16, 0)!.blockTable).toEqual([0, 1, 2, 3]);
  });

  it("leaves a prefix hit untouched when the allocation fails", () => {
    const kv = manager(4);
    admit(kv, "a", range(0, 9)); // blocks 0,1 cached, 2 partial
    kv.free("a");
    const computed = kv.getComputedBlocks([...range(0, 8), ...range(20, 30)]);
    expect(computed.blockIds).toEqual([0, 1]);
    // 18 tokens need 5 blocks: 2 hit + 3 new, but only 2 non-hit blocks are free.
    expect(kv.allocateSlots("b", 18, 8, computed)).toBeNull();
    expect(kv.stats()).toMatchObject({ used: 0, free: 4, cached: 2 });
    kv.checkInvariants();
    expect(kv.allocateSlots("b", 16, 8, computed)!.blockTable.slice(0, 2)).toEqual([0, 1]);
    kv.checkInvariants();
  });

  it("refuses a stale prefix hit whose blocks were evicted in between", () => {
    const kv = manager(3);
    admit(kv, "a", range(0, 5));
    kv.free("a");
    const computed = kv.getComputedBlocks(range(0, 6));
    expect(computed.numCachedTokens).toBe(4);
    kv.allocateSlots("x", 12, 0); // evicts everything
    kv.free("x");
    expect(() => kv.allocateSlots("b", 6, 4, computed)).toThrow(/block \d+ .*evicted/);
  });

  it("fork shares every block; the first writer of a shared partial block gets a copy", () => {
    const kv = manager(8);
    kv.allocateSlots("p", 6, 0); // [0, 1], block 1 holds 2 of 4 tokens
    kv.fork("p", "c");
    expect(kv.blockTable("c")).toEqual([0, 1]);
    expect(kv.stats().used).toBe(2);
    kv.checkInvariants();

    expect(kv.allocateSlots("c", 7, 0)).toEqual({ blockTable: [0, 2], copies: [[1, 2]] });
    expect(kv.allocateSlots("p", 7, 0)).toEqual({ blockTable: [0, 1], copies: [] }); // block 1 is p's alone now
    expect(kv.allocateSlots("c", 9, 0)).toEqual({ blockTable: [0, 2, 3], copies: [] });
    kv.checkInvariants();
    kv.free("p");
    kv.free("c");
    expect(kv.stats()).toMatchObject({ used: 0, free: 8 });
    kv.checkInvariants();
  });

  it("never copies a full block, and a step that writes nothing copies nothing", () => {
    const kv = manager(8);
    kv.allocateSlots("p", 8, 0); // two full blocks
    kv.fork("p", "c");
    expect(kv.allocateSlots("c", 8, 0)).toEqual({ blockTable: [0, 1], copies: [] });
    expect(kv.allocateSlots("c", 9, 0)).toEqual({ blockTable: [0, 1, 2], copies: [] });
    expect(kv.allocateSlots("p", 9, 0)).toEqual({ blockTable: [0, 1, 3], copies: [] });
  });

  it("copy-on-write counts the copy toward all-or-nothing", () => {
    const kv = manager(3);
    kv.allocateSlots("p", 6, 0); // [0, 1]
    kv.fork("p", "c");
    kv.allocateSlots("x", 4, 0); // [2]: pool now full
    expect(kv.allocateSlots("c", 7, 0)).toBeNull();
    expect(kv.blockTable("c")).toEqual([0, 1]);
    kv.checkInvariants();
    kv.free("x");
    expect(kv.allocateSlots("c", 7, 0)).toEqual({ blockTable: [0, 2], copies: [[1, 2]] });
  });

  it("reports no hits with prefix caching off", () => {
    const kv = manager(8, 4, false);
    admit(kv, "a", range(0, 9));
    expect(admit(kv, "b", range(0, 9)).computed.numCachedTokens).toBe(0);
    expect(kv.stats()).toMatchObject({ cached: 0, hitRate: 0 });
    kv.checkInvariants();
  });

  it("keeps its invariants and KV contents under random operations (property)", () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 1, maxLength: 60, size: "max" }), fc.boolean(), checkRandomOps),
      {
        numRuns: 150,
      },
    );
  });
});

// ---------------------------------------------------------------------------------------------------------------
// Random-operation model: simulates the KV memory the block tables point at, so a block shared or reused wrongly
// shows up as a request reading back tokens it never wrote.
// ---------------------------------------------------------------------------------------------------------------

type Op =
  | { kind: "add"; template: number; prefixLen: number; suffix: number[]; chunk: number }
  | { kind: "grow"; who: number; append: number[]; chunk: number }
  | { kind: "fork"; who: number }
  | { kind: "free"; who: number };

const TEMPLATES = [range(0, 20).map((i) => i % 3), range(0, 20).map((i) => (i * 7) % 4), range(0, 20).map(() => 1)];
const tokenArb = fc.integer({ min: 0, max: 3 });
const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("add" as const),
      template: fc.nat(TEMPLATES.length - 1),
      prefixLen: fc.integer({ min: 3, max: 20 }),
      suffix: fc.array(tokenArb, { maxLength: 6 }),
      chunk: fc.integer({ min: 1, max: 12 }),
    }),
  },
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant("grow" as const),
      who: fc.nat(),
      // Wide token range: two requests writing the same slot almost always write different tokens.
      append: fc.array(fc.nat(999), { minLength: 1, maxLength: 3 }),
      chunk: fc.integer({ min: 1, max: 6 }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("fork" as const), who: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("free" as const), who: fc.nat() }) },
);

interface ModelRequest {
  id: string;
  tokens: number[];
  /** Tokens whose KV is written (the block table covers exactly these). */
  computed: number;
}

function checkRandomOps(ops: Op[], enablePrefixCaching: boolean): void {
  const blockSize = 3;
  const numBlocks = 10;
  const kv = new KVCacheManager({ numBlocks, blockSize, enablePrefixCaching });
  const memory: (number | undefined)[][] = Array.from({ length: numBlocks }, () => []);
  const live: ModelRequest[] = [];
  let nextId = 0;

  const write = (req: ModelRequest, table: number[], copies: [number, number][], upTo: number) => {
    for (const [src, dst] of copies) memory[dst] = [...memory[src]];
    for (let pos = req.computed; pos < upTo; pos++) {
      memory[table[Math.floor(pos / blockSize)]][pos % blockSize] = req.tokens[pos];
    }
    req.computed = upTo;
    kv.cacheFullBlocks(req.id, req.tokens, req.computed);
  };
  const verify = () => {
    kv.checkInvariants();
    for (const req of live) {
      const table = kv.blockTable(req.id);
      expect(table.length).toBe(KVCacheManager.blocksForTokens(req.computed, blockSize));
      const seen = range(0, req.computed).map((pos) => memory[table[Math.floor(pos / blockSize)]][pos % blockSize]);
      expect(seen).toEqual(req.tokens.slice(0, req.computed));
    }
  };

  for (const op of ops) {
    if (op.kind === "add") {
      const req = {
        id: `r${nextId++}`,
        tokens: [...TEMPLATES[op.template].slice(0, op.prefixLen), ...op.suffix],
        computed: 0,
      };
      if (req.tokens.length === 0) continue;
      const hit = kv.getComputedBlocks(req.tokens);
      expect(hit.numCachedTokens).toBeLessThan(req.tokens.length);
      const upTo = Math.min(req.tokens.length, hit.numCachedTokens + op.chunk);
      const alloc = kv.allocateSlots(req.id, upTo, hit.numCachedTokens, hit);
      if (alloc === null) {
        expect(kv.blockTable(req.id)).toEqual([]);
      } else {
        live.push(req);
        req.computed = hit.numCachedTokens; // these tokens' KV must already be in the hit blocks
        write(req, alloc.blockTable, alloc.copies, upTo);
      }
    } else if (live.length > 0) {
      const req = live[op.who % live.length];
      if (op.kind === "grow") {
        if (req.computed === req.tokens.length) req.tokens.push(...op.append);
        const upTo = Math.min(req.tokens.length, req.computed + op.chunk);
        const before = kv.blockTable(req.id);
        const alloc = kv.allocateSlots(req.id, upTo, 0);
        if (alloc === null) expect(kv.blockTable(req.id)).toEqual(before);
        else write(req, alloc.blockTable, alloc.copies, upTo);
      } else if (op.kind === "fork") {
        const child = { id: `r${nextId++}`, tokens: req.tokens.slice(0, req.computed), computed: req.computed };
        kv.fork(req.id, child.id);
        live.push(child);
      } else {
        kv.free(req.id);
        live.splice(live.indexOf(req), 1);
      }
    }
    verify();
  }

  for (const req of live) kv.free(req.id);
  kv.checkInvariants();
  expect(kv.stats()).toMatchObject({ total: numBlocks, used: 0, free: numBlocks });
}

describe("cachedBlockHashes", () => {
  it("lists blocks a later request would hit: in-use ones, then freed ones last-evicted first", () => {
    const m = new KVCacheManager({ numBlocks: 8, blockSize: 2, enablePrefixCaching: true });
    const a = [1, 2, 3, 4, 5];
    const b = [9, 8, 7, 6, 5];
    for (const [id, toks] of [
      ["a", a],
      ["b", b],
    ] as const) {
      const hit = m.getComputedBlocks(toks);
      m.allocateSlots(id, toks.length, hit.numCachedTokens, hit);
      m.cacheFullBlocks(id, toks, toks.length);
    }
    m.free("a");
    const hashes = m.cachedBlockHashes(10);
    const hb1 = hashBlockTokens("", [9, 8]);
    const ha1 = hashBlockTokens("", [1, 2]);
    const ha2 = hashBlockTokens(ha1, [3, 4]);
    expect(hashes.slice(0, 2)).toEqual([hb1, hashBlockTokens(hb1, [7, 6])]);
    // a's blocks were freed tail first, so its first block is evicted last and listed first
    expect(hashes.slice(2)).toEqual([ha1, ha2]);
    expect(m.cachedBlockHashes(1)).toHaveLength(1);
  });
});
