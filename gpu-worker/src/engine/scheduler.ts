import type { KVCacheManager } from "./kv-cache-manager.ts";
import { isFinished, type Request, RequestStatus } from "./request.ts";

export interface SchedulerConfig {
  /** Most sequences in one step (running batch size). */
  maxNumSeqs: number;
  /** Token budget of one step: decode tokens plus prefill chunk tokens. */
  maxNumBatchedTokens: number;
}

/** One request's share of a step. */
export interface ScheduledRequest {
  request: Request;
  /** Tokens computed this step, starting at request.numComputedTokens. */
  numNewTokens: number;
  /** Full block table after allocation. */
  blockTable: number[];
}

/** The plan for one step; the engine turns it into model inputs. */
export interface SchedulerOutput {
  scheduled: ScheduledRequest[];
  /** (src, dst) block copies to apply before the step (copy-on-write of shared partial blocks). */
  blockCopies: [number, number][];
  /** Sum of numNewTokens over `scheduled`; never above maxNumBatchedTokens. */
  numScheduledTokens: number;
  /** Requests preempted while building this plan (their blocks are already free). */
  preempted: Request[];
}

export function makeEmptySchedulerOutput(): SchedulerOutput {
  return { scheduled: [], blockCopies: [], numScheduledTokens: 0, preempted: [] };
}

/**
 * Iteration-level scheduler in vLLM v1's shape.
 *
 * NOTE: there are no separate prefill and decode phases. Every request has numTokens (prompt + output so far)
 * and numComputedTokens (KV in the cache); a step gives each scheduled request up to its remaining gap, within
 * the step's token budget. A decoding request's gap is 1; a prefilling one's is the rest of its prompt, which a
 * small budget splits into chunks across steps, so long prompts never stall running streams.
 *
 * Order: running requests first (oldest first), then waiting ones strictly first come, first served. When
 * blocks run out, the most recently admitted running request is preempted (its blocks freed, its tokens
 * recomputed later through the prefix cache); nothing it already emitted changes.
 */
export class Scheduler {
  /** FCFS queue; preempted requests go back to the front. */
  readonly waiting: Request[] = [];
  /** In admission order: the last one is the first to be preempted. */
  readonly running: Request[] = [];
  numPreemptions = 0;

  constructor(
    readonly config: SchedulerConfig,
    private readonly kv: KVCacheManager,
  ) {}

  add(request: Request): void {
    this.waiting.push(request);
  }

  get hasUnfinished(): boolean {
    return this.waiting.length > 0 || this.running.length > 0;
  }

  schedule(): SchedulerOutput {
    const out = makeEmptySchedulerOutput();
    let budget = this.config.maxNumBatchedTokens;
    budget = this.scheduleRunning(out, budget);
    // Admitting new work while others were just preempted for memory would thrash.
    if (out.preempted.length === 0) this.scheduleWaiting(out, budget);
    return out;
  }

  private scheduleRunning(out: SchedulerOutput, budget: number): number {
    let i = 0;
    while (i < this.running.length && budget > 0) {
      const req = this.running[i];
      const numNew = Math.min(req.numTokens - req.numComputedTokens, budget);
      if (numNew <= 0) {
        i++;
        continue;
      }
      let alloc = this.kv.allocateSlots(req.requestId, req.numComputedTokens + numNew, 0);
      while (alloc === null) {
        // Out of blocks: take them back from the most recently admitted request.
        const victim = this.running.pop()!;
        this.preempt(victim);
        out.preempted.push(victim);
        if (victim === req) break;
        alloc = this.kv.allocateSlots(req.requestId, req.numComputedTokens + numNew, 0);
      }
      if (alloc === null) break; // req itself was preempted
      out.scheduled.push({ request: req, numNewTokens: numNew, blockTable: alloc.blockTable });
      out.blockCopies.push(...alloc.copies);
      out.numScheduledTokens += numNew;
      budget -= numNew;
      i++;
    }
    return budget;
  }

  private scheduleWaiting(out: SchedulerOutput, budget: number): void {
    while (this.waiting.length > 0 && budget > 0 && this.running.length < this.config.maxNumSeqs) {
      const req = this.waiting[0];
      const computed = this.kv.getComputedBlocks(req.tokenIds);
      const numComputed = computed.numCachedTokens;
      const numNew = Math.min(req.numTokens - numComputed, budget);
      const alloc = this.kv.allocateSlots(req.requestId, numComputed + numNew, numComputed, computed);
      if (alloc === null) break; // FCFS: nobody overtakes the head of the queue
      // Only an admission that succeeds says what the cache served (the hit may be evicted before a retry).
      if (req.numCachedTokens < 0) req.numCachedTokens = numComputed;
      this.waiting.shift();
      req.numComputedTokens = numComputed;
      req.status = RequestStatus.RUNNING;
      this.running.push(req);
      out.scheduled.push({ request: req, numNewTokens: numNew, blockTable: alloc.blockTable });
      out.blockCopies.push(...alloc.copies);
      out.numScheduledTokens += numNew;
      budget -= numNew;
    }
  }

  private preempt(req: Request): void {
    this.kv.free(req.requestId);
    req.status = RequestStatus.PREEMPTED;
    req.numComputedTokens = 0;
    req.numPreemptions++;
    this.numPreemptions++;
    this.waiting.unshift(req);
  }

  /** Remove a finished or aborted request from the queues and free its blocks at once. */
  finish(req: Request, status: RequestStatus): void {
    if (!isFinished(status)) throw new Error(`finish(${req.requestId}) with non-final status ${status}`);
    req.status = status;
    const r = this.running.indexOf(req);
    if (r >= 0) this.running.splice(r, 1);
    const w = this.waiting.indexOf(req);
    if (w >= 0) this.waiting.splice(w, 1);
    this.kv.free(req.requestId);
  }
}
