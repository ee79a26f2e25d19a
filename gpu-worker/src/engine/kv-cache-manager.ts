/**
 * The per-request view of the KV cache: block tables, prefix-cache lookups, fork and copy-on-write.
 * Built on `block-pool.ts`; the scheduler only ever gets plain values (block ids, counts) back, never blocks.
 *
 * NOTE: a request's block table always covers exactly the tokens the scheduler last asked for in
 * `allocateSlots` (its computed tokens once the step has run). Positions below that are never written again,
 * which is why full blocks, cached or shared, never need copying: only a shared *partial* last block does.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { BlockPool, type KVBlock } from "./block-pool.ts";

/** A prefix-cache hit, as `getComputedBlocks` returns it and `allocateSlots` adopts it. */
export interface ComputedBlocks {
  /** Physical ids of the hit blocks, in prompt order. */
  blockIds: number[];
  /** blockIds.length * blockSize; always < the prompt's length. */
  numCachedTokens: number;
  /** Chained hash of each hit block, so adoption can check the blocks were not evicted in between. */
  blockHashes: string[];
  /** Tokens looked up; with numCachedTokens, counted toward the hit rate when the hit is adopted. */
  numQueriedTokens: number;
}

/** What the model runner needs before a step that writes a request's KV. */
export interface SlotAllocation {
  /** Physical block id for each logical block of the request. */
  blockTable: number[];
  /** Copy-on-write: copy KV rows of block src into block dst before the step. */
  copies: [srcBlockId: number, dstBlockId: number][];
}

export interface KVCacheStats {
  total: number;
  used: number;
  free: number;
  /** Free blocks that still hold reusable prefix-cache content. */
  cached: number;
  /** Cached prompt tokens / prompt tokens looked up, since start. */
  hitRate: number;
}

interface RequestBlocks {
  blocks: KVBlock[];
  /** Tokens the block table covers (the last numTokensTotal passed to allocateSlots). */
  numTokens: number;
  /** Chained hashes of the request's leading full blocks computed so far. */
  blockHashes: string[];
  /** Leading blocks already handed to the pool's cache (or found to be cached). */
  numCachedBlocks: number;
}

/** Parent hash of a request's first block. */
const ROOT_HASH = "";

/**
 * hash(parentHash, tokenIds of one block): sha256 truncated to 128 bits, so a collision (which would serve
 * another prompt's KV) is practically impossible. The parent hash makes a block's hash depend on its whole prefix.
 */
export function hashBlockTokens(parentHash: string, tokenIds: readonly number[]): string {
  const ids = Int32Array.from(tokenIds);
  return createHash("sha256")
    .update(parentHash)
    .update(Buffer.from(ids.buffer, ids.byteOffset, ids.byteLength))
    .digest("base64url")
    .slice(0, 22);
}

export class KVCacheManager {
  readonly blockSize: number;
  readonly enablePrefixCaching: boolean;
  private readonly pool: BlockPool;
  private readonly requests = new Map<string, RequestBlocks>();
  private numQueriedTokens = 0;
  private numHitTokens = 0;

  constructor(opts: { numBlocks: number; blockSize: number; enablePrefixCaching: boolean }) {
    if (!Number.isInteger(opts.blockSize) || opts.blockSize < 1) {
      throw new Error(`KVCacheManager: blockSize must be >= 1, got ${opts.blockSize}`);
    }
    this.blockSize = opts.blockSize;
    this.enablePrefixCaching = opts.enablePrefixCaching;
    this.pool = new BlockPool(opts.numBlocks, opts.enablePrefixCaching);
  }

  static blocksForTokens(n: number, blockSize: number): number {
    return Math.ceil(n / blockSize);
  }

  get numFreeBlocks(): number {
    return this.pool.numFreeBlocks;
  }

  /**
   * The longest run of leading full blocks of `tokenIds` found in the prefix cache. At least one token is
   * always left to compute (the last prompt token is recomputed to get its logits), so a hit covers at most
   * `tokenIds.length - 1` tokens rounded down to whole blocks. Pass the result straight to `allocateSlots` in
   * the same step; the hit rate counts it only once adopted, so retrying a blocked request does not skew it.
   */
  getComputedBlocks(tokenIds: readonly number[]): ComputedBlocks {
    const hit: ComputedBlocks = { blockIds: [], numCachedTokens: 0, blockHashes: [], numQueriedTokens: 0 };
    if (!this.enablePrefixCaching) return hit;
    hit.numQueriedTokens = tokenIds.length;
    const maxBlocks = Math.floor(Math.max(0, tokenIds.length - 1) / this.blockSize);
    let parent = ROOT_HASH;
    for (let i = 0; i < maxBlocks; i++) {
      const hash = hashBlockTokens(parent, tokenIds.slice(i * this.blockSize, (i + 1) * this.blockSize));
      const block = this.pool.getCachedBlock(hash);
      if (block === null) break;
      hit.blockIds.push(block.id);
      hit.blockHashes.push(hash);
      parent = hash;
    }
    hit.numCachedTokens = hit.blockIds.length * this.blockSize;
    return hit;
  }

  /**
   * Grows the request's block table to cover `numTokensTotal` tokens (its computed tokens after this step).
   * On the request's first call, `computed` (from getComputedBlocks) is adopted first and `numNewComputed`
   * must equal `computed.numCachedTokens` (0 without a hit); later calls pass 0 and no `computed`.
   * If the step writes into a partial last block shared with a fork, the request first gets a private copy,
   * listed in `copies`.
   *
   * @returns the full block table and the copies to perform, or null when blocks are short, in which case
   * nothing changed (the scheduler preempts or waits).
   */
  allocateSlots(
    requestId: string,
    numTokensTotal: number,
    numNewComputed: number,
    computed?: ComputedBlocks,
  ): SlotAllocation | null {
    const req = this.requests.get(requestId);
    const hit = computed ?? { blockIds: [], numCachedTokens: 0, blockHashes: [], numQueriedTokens: 0 };
    if (numNewComputed !== hit.numCachedTokens) {
      throw new Error(`allocateSlots(${requestId}): numNewComputed ${numNewComputed} != ${hit.numCachedTokens}`);
    }
    if (req !== undefined && hit.blockIds.length > 0) {
      throw new Error(`allocateSlots(${requestId}): cached blocks can only be adopted on the first allocation`);
    }
    if (numTokensTotal < hit.numCachedTokens) {
      throw new Error(`allocateSlots(${requestId}): ${numTokensTotal} tokens < ${hit.numCachedTokens} cached`);
    }
    const hitBlocks = hit.blockIds.map((id, i) => this.checkedHitBlock(requestId, id, hit.blockHashes[i]));

    const numHave = req === undefined ? hitBlocks.length : req.blocks.length;
    const numNew = Math.max(0, KVCacheManager.blocksForTokens(numTokensTotal, this.blockSize) - numHave);
    const cowIndex = req === undefined ? -1 : this.sharedPartialBlockIndex(req, numTokensTotal);
    // Adopting a hit block that sits in the free queue takes it out of the free count too.
    const numFreeHits = hitBlocks.filter((b) => b.refCount === 0).length;
    const numNeeded = numNew + (cowIndex >= 0 ? 1 : 0);
    if (numNeeded > this.pool.numFreeBlocks - numFreeHits) return null;

    const state = req ?? { blocks: [], numTokens: 0, blockHashes: [], numCachedBlocks: 0 };
    const copies: [number, number][] = [];
    if (req === undefined) {
      this.pool.touch(hitBlocks);
      state.blocks.push(...hitBlocks);
      state.numTokens = hit.numCachedTokens;
      state.blockHashes.push(...hit.blockHashes);
      state.numCachedBlocks = hitBlocks.length;
      this.requests.set(requestId, state);
      this.numQueriedTokens += hit.numQueriedTokens;
      this.numHitTokens += hit.numCachedTokens;
    }
    if (cowIndex >= 0) {
      const src = state.blocks[cowIndex];
      const [dst] = this.pool.allocate(1)!;
      this.pool.free([src]);
      state.blocks[cowIndex] = dst;
      copies.push([src.id, dst.id]);
    }
    if (numNew > 0) state.blocks.push(...this.pool.allocate(numNew)!);
    state.numTokens = Math.max(state.numTokens, numTokensTotal);
    return { blockTable: state.blocks.map((b) => b.id), copies };
  }

  /**
   * Registers the request's newly full blocks (all of whose tokens are computed) in the prefix cache, so later
   * requests can hit them. Call after each step with the request's token ids and computed-token count.
   */
  cacheFullBlocks(requestId: string, tokenIds: readonly number[], numComputedTokens: number): void {
    if (!this.enablePrefixCaching) return;
    const req = this.mustGet(requestId, "cacheFullBlocks");
    const numFull = Math.min(
      Math.floor(Math.min(numComputedTokens, tokenIds.length, req.numTokens) / this.blockSize),
      req.blocks.length,
    );
    for (let i = req.numCachedBlocks; i < numFull; i++) {
      let hash = req.blockHashes[i];
      if (hash === undefined) {
        hash = hashBlockTokens(
          req.blockHashes[i - 1] ?? ROOT_HASH,
          tokenIds.slice(i * this.blockSize, (i + 1) * this.blockSize),
        );
        req.blockHashes.push(hash);
      }
      const block = req.blocks[i];
      if (block.hash !== null && block.hash !== hash) {
        throw new Error(`cacheFullBlocks(${requestId}): block ${block.id} (index ${i}) is cached with other content`);
      }
      this.pool.cacheFullBlock(block, hash);
    }
    req.numCachedBlocks = Math.max(req.numCachedBlocks, numFull);
  }

  /**
   * The child shares every block of the parent (including a partial last block) and starts from the parent's
   * token count; whichever of them first writes into a shared partial block gets a private copy.
   */
  fork(parentId: string, childId: string): void {
    const parent = this.mustGet(parentId, "fork");
    if (this.requests.has(childId)) throw new Error(`fork(${parentId}, ${childId}): ${childId} already has blocks`);
    this.pool.touch(parent.blocks);
    this.requests.set(childId, {
      blocks: [...parent.blocks],
      numTokens: parent.numTokens,
      blockHashes: [...parent.blockHashes],
      numCachedBlocks: parent.numCachedBlocks,
    });
  }

  /** Returns the request's blocks to the pool, tail first so its tail is evicted first. Unknown ids are a no-op. */
  free(requestId: string): void {
    const req = this.requests.get(requestId);
    if (req === undefined) return;
    this.pool.free([...req.blocks].reverse());
    this.requests.delete(requestId);
  }

  /** Hashes of the blocks a new request could hit, most useful first (see BlockPool.cachedHashes). */
  cachedBlockHashes(limit: number): string[] {
    return this.pool.cachedHashes(limit);
  }

  /** The request's physical block ids (a copy; empty for an unknown request). */
  blockTable(requestId: string): readonly number[] {
    return this.requests.get(requestId)?.blocks.map((b) => b.id) ?? [];
  }

  stats(): KVCacheStats {
    return {
      total: this.pool.numBlocks,
      used: this.pool.numUsedBlocks,
      free: this.pool.numFreeBlocks,
      cached: this.pool.numCachedBlocks,
      hitRate: this.numQueriedTokens === 0 ? 0 : this.numHitTokens / this.numQueriedTokens,
    };
  }

  /** Pool invariants plus: reference counts equal the number of block tables holding each block. */
  checkInvariants(): void {
    this.pool.checkInvariants();
    const refs = new Int32Array(this.pool.numBlocks);
    for (const [id, req] of this.requests) {
      const want = KVCacheManager.blocksForTokens(req.numTokens, this.blockSize);
      if (req.blocks.length !== want) {
        throw new Error(`KVCacheManager: ${id} has ${req.blocks.length} blocks for ${req.numTokens} tokens`);
      }
      for (const b of req.blocks) refs[b.id]++;
    }
    for (let i = 0; i < refs.length; i++) {
      const b = this.pool.block(i);
      if (b.refCount !== refs[i]) {
        throw new Error(`KVCacheManager: block ${i} has refCount ${b.refCount} but ${refs[i]} requests hold it`);
      }
    }
  }

  /** Index of the partial last block if this step writes into it while another request shares it, else -1. */
  private sharedPartialBlockIndex(req: RequestBlocks, numTokensTotal: number): number {
    if (numTokensTotal <= req.numTokens || req.numTokens % this.blockSize === 0) return -1;
    const i = Math.floor(req.numTokens / this.blockSize);
    return req.blocks[i].refCount > 1 ? i : -1;
  }

  private checkedHitBlock(requestId: string, id: number, hash: string | undefined): KVBlock {
    const block = this.pool.block(id);
    if (hash === undefined || block.hash !== hash) {
      throw new Error(`allocateSlots(${requestId}): block ${id} of the prefix hit was evicted since getComputedBlocks`);
    }
    return block;
  }

  private mustGet(requestId: string, op: string): RequestBlocks {
    const req = this.requests.get(requestId);
    if (req === undefined) throw new Error(`${op}: request ${requestId} has no blocks`);
    return req;
  }
}
