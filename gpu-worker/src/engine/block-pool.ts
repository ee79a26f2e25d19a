/**
 * The physical KV-cache blocks: reference counts, the free queue in eviction order, and the prefix-cache hash map.
 * Knows nothing about requests or scheduling; `kv-cache-manager.ts` builds the per-request view on top of it.
 *
 * There is no reserved "null block": every id in [0, numBlocks) can be handed out. The model runner pads block
 * tables with any id it likes, since padded slots are masked out of attention.
 *
 * @module
 */

/** One block of `blockSize` KV rows in the cache tensors; `id` is its row-group index there. */
export interface KVBlock {
  readonly id: number;
  /** Number of requests whose block table holds this block; 0 = it sits in the free queue. */
  refCount: number;
  /** prefix-cache hash when the block is full and cached */
  hash: string | null;
}

/** Marks "no neighbour" in the intrusive free-queue links. */
const NIL = -1;

export class BlockPool {
  readonly numBlocks: number;
  readonly enableCaching: boolean;
  private readonly blocks: KVBlock[];
  // The free queue is a doubly linked list threaded through these arrays (indexed by block id), so a prefix hit
  // can pull a block out of the middle in O(1). Head = next to evict (least recently freed).
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  private head = NIL;
  private tail = NIL;
  private numFree = 0;
  /** Free blocks that still hold a cached hash (evictable but reusable). */
  private numCachedFree = 0;
  private readonly blockByHash = new Map<string, KVBlock>();

  constructor(numBlocks: number, enableCaching: boolean) {
    if (!Number.isInteger(numBlocks) || numBlocks < 1)
      throw new Error(`BlockPool: numBlocks must be >= 1, got ${numBlocks}`);
    this.numBlocks = numBlocks;
    this.enableCaching = enableCaching;
    this.blocks = Array.from({ length: numBlocks }, (_, id) => ({ id, refCount: 0, hash: null }));
    this.prev = new Int32Array(numBlocks);
    this.next = new Int32Array(numBlocks);
    for (const b of this.blocks) this.pushTail(b.id);
  }

  get numFreeBlocks(): number {
    return this.numFree;
  }

  /** Free blocks whose content is still findable by hash (they count as free too). */
  get numCachedBlocks(): number {
    return this.numCachedFree;
  }

  get numUsedBlocks(): number {
    return this.numBlocks - this.numFree;
  }

  /**
   * Takes `n` blocks from the head of the free queue, each with refCount 1.
   * Returns null (and changes nothing) when fewer than `n` are free: scarcity is the caller's to handle.
   */
  allocate(n: number): KVBlock[] | null {
    if (n > this.numFree) return null;
    const out: KVBlock[] = [];
    for (let i = 0; i < n; i++) {
      const b = this.blocks[this.head];
      this.unlink(b.id);
      this.evict(b);
      b.refCount = 1;
      out.push(b);
    }
    return out;
  }

  /**
   * Drops one reference from each block; blocks reaching 0 join the tail of the free queue in the given order,
   * so callers pass a request's blocks tail-first to have its tail evicted first. Cached blocks stay findable.
   */
  free(blocks: readonly KVBlock[]): void {
    for (const b of blocks) {
      if (b.refCount <= 0) throw new Error(`BlockPool.free: block ${b.id} is already free (double free)`);
      b.refCount--;
      if (b.refCount === 0) {
        this.pushTail(b.id);
        if (b.hash !== null) this.numCachedFree++;
      }
    }
  }

  /** A prefix hit on `blocks`: one more reference each; free ones leave the free queue. */
  touch(blocks: readonly KVBlock[]): void {
    for (const b of blocks) {
      if (b.refCount === 0) {
        this.unlink(b.id);
        if (b.hash !== null) this.numCachedFree--;
      }
      b.refCount++;
    }
  }

  getCachedBlock(hash: string): KVBlock | null {
    return this.blockByHash.get(hash) ?? null;
  }

  /**
   * Registers a full block under `hash` so later requests can hit it. A full cached block is immutable.
   * If another block already holds `hash` (two requests computed the same block at once), this one stays
   * uncached: the map keeps one block per hash, and the duplicate is recycled normally when freed.
   */
  cacheFullBlock(block: KVBlock, hash: string): void {
    if (!this.enableCaching || block.hash === hash) return;
    if (block.hash !== null) {
      throw new Error(`BlockPool.cacheFullBlock: block ${block.id} is already cached under another hash`);
    }
    if (this.blockByHash.has(hash)) return;
    block.hash = hash;
    this.blockByHash.set(hash, block);
    if (block.refCount === 0) this.numCachedFree++;
  }

  /** The block with this id (for tests and the manager's bookkeeping). */
  /**
   * Hashes of cached blocks for load reports (prefix-affinity routing): blocks in use first, then free ones
   * starting with the last to be evicted; at most `limit`.
   */
  cachedHashes(limit: number): string[] {
    const out: string[] = [];
    for (const [hash, b] of this.blockByHash) {
      if (out.length >= limit) return out;
      if (b.refCount > 0) out.push(hash);
    }
    for (let id = this.tail; id !== NIL && out.length < limit; id = this.prev[id]) {
      const h = this.blocks[id].hash;
      if (h !== null) out.push(h);
    }
    return out;
  }

  block(id: number): KVBlock {
    const b = this.blocks[id];
    if (b === undefined) throw new Error(`BlockPool: no block ${id}`);
    return b;
  }

  /** Free block ids from next-to-evict to last (for tests). */
  freeQueueIds(): number[] {
    const ids: number[] = [];
    for (let id = this.head; id !== NIL; id = this.next[id]) ids.push(id);
    return ids;
  }

  /** Throws an Error naming the offending block ids if any bookkeeping is inconsistent. */
  checkInvariants(): void {
    const inQueue = new Uint8Array(this.numBlocks);
    let count = 0;
    let cachedFree = 0;
    for (let id = this.head, prev = NIL; id !== NIL; prev = id, id = this.next[id]) {
      if (id < 0 || id >= this.numBlocks) throw new Error(`BlockPool: free queue holds bad id ${id}`);
      if (inQueue[id]) throw new Error(`BlockPool: block ${id} is in the free queue twice`);
      if (this.prev[id] !== prev) throw new Error(`BlockPool: block ${id} has prev ${this.prev[id]}, expected ${prev}`);
      inQueue[id] = 1;
      count++;
      if (this.blocks[id].hash !== null) cachedFree++;
      if (this.next[id] === NIL && this.tail !== id)
        throw new Error(`BlockPool: tail is ${this.tail}, queue ends at ${id}`);
    }
    if (count !== this.numFree)
      throw new Error(`BlockPool: free queue has ${count} blocks, count says ${this.numFree}`);
    if (cachedFree !== this.numCachedFree) {
      throw new Error(`BlockPool: ${cachedFree} cached free blocks, count says ${this.numCachedFree}`);
    }
    for (const b of this.blocks) {
      if (b.refCount < 0) throw new Error(`BlockPool: block ${b.id} has refCount ${b.refCount}`);
      if ((b.refCount === 0) !== (inQueue[b.id] === 1)) {
        throw new Error(
          `BlockPool: block ${b.id} has refCount ${b.refCount} but is ${inQueue[b.id] ? "" : "not "}free`,
        );
      }
      if (b.hash !== null && this.blockByHash.get(b.hash) !== b) {
        throw new Error(`BlockPool: block ${b.id} has hash ${b.hash} but the hash map does not point to it`);
      }
    }
    for (const [hash, b] of this.blockByHash) {
      if (b.hash !== hash)
        throw new Error(`BlockPool: hash map entry ${hash} points to block ${b.id} (hash ${b.hash})`);
    }
    if (!this.enableCaching && this.blockByHash.size > 0)
      throw new Error("BlockPool: caching is off but blocks are cached");
  }

  /** Forgets a block's cached content because it is about to be overwritten. */
  private evict(b: KVBlock): void {
    if (b.hash === null) return;
    this.blockByHash.delete(b.hash);
    b.hash = null;
    this.numCachedFree--;
  }

  private pushTail(id: number): void {
    this.prev[id] = this.tail;
    this.next[id] = NIL;
    if (this.tail === NIL) this.head = id;
    else this.next[this.tail] = id;
    this.tail = id;
    this.numFree++;
  }

  private unlink(id: number): void {
    const p = this.prev[id];
    const n = this.next[id];
    if (p === NIL) this.head = n;
    else this.next[p] = n;
    if (n === NIL) this.tail = p;
    else this.prev[n] = p;
    this.prev[id] = NIL;
    this.next[id] = NIL;
    this.numFree--;
  }
}
