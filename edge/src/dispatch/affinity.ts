/**
 * Prefix affinity: send a request to the worker that already caches its prompt's prefix, unless that worker is
 * saturated. Two sources of "who caches what":
 *
 * 1. Workers' load reports carry the hashes of blocks in their prefix cache (chained sha256 over block-sized runs
 *    of token ids, as gpu-worker/src/engine/kv-cache-manager.ts computes them). The gateway can recompute those
 *    only for prompts given as token ids: it has no tokenizer (rendering and tokenizing stay on the workers).
 * 2. For text and chat prompts, the gateway learns: when a worker starts a request, every prefix key of its prompt
 *    (one per leading message of a chat, one per 128-character run of a text) now points to that worker, as
 *    SGLang's router does with its approximate radix tree. The next request sharing a system prompt finds it.
 *
 * Load reports also say whether a worker has room (running/waiting against max_num_seqs, free KV blocks), is
 * draining, and where it takes requests addressed to it (`direct_subject`, see PoolNames.direct in shared/src/protocol.ts); a worker that has not
 * reported for three intervals is considered gone.
 *
 * @module
 */
import { LOAD_REPORT_INTERVAL_MS, type LoadReport, type SubmitRequest } from "@llama-edge/shared";

/** A prompt as submitted (chat's add_generation_prompt may still be unset). */
type Prompt = SubmitRequest["prompt"];

/** Characters per prefix key of a text prompt (about a 32-token block of English). */
const TEXT_CHUNK_CHARS = 128;
/** Token ids per prefix key of a token prompt without a known block size. */
const TOKEN_CHUNK = 16;
/** Prefix keys per prompt: enough for ~16 KB of shared text. */
const MAX_KEYS = 128;
/** Learned prefix entries kept (LRU). */
const MAX_LEARNED = 100_000;
/** A learned entry older than this is not trusted: the worker has probably evicted those blocks. */
const LEARNED_TTL_MS = 10 * 60_000;
/** Keep this fraction of KV blocks free on a worker we pick (its own pull watermark is 5%). */
const KV_FREE_MIN = 0.05;

/** cyrb53: a fast 53-bit string hash. Collisions only misroute a request, so a cryptographic hash is not needed. */
function hash53(s: string, seed = 0): string {
  let h1 = 0xdeadbeef ^ seed;
  let h2 = 0x41c6ce57 ^ seed;
  for (let i = 0; i < s.length; i++) {
    const ch = s.charCodeAt(i);
    h1 = Math.imul(h1 ^ ch, 2654435761);
    h2 = Math.imul(h2 ^ ch, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return (4294967296 * (2097151 & h2) + (h1 >>> 0)).toString(36);
}

/**
 * Chained keys of a prompt's prefixes, shortest first: key i covers everything key i-1 covers plus one more unit
 * (a chat message, a text chunk, a run of token ids). Two prompts share key i iff they share that whole prefix.
 */
export function prefixKeys(prompt: Prompt): string[] {
  const keys: string[] = [];
  let parent: string = prompt.type;
  const add = (unit: string) => {
    parent = hash53(`${parent}\u0000${unit}`);
    keys.push(parent);
  };
  switch (prompt.type) {
    case "chat":
      // Tools come first in the rendered prompt (templates put them in the system turn).
      if (prompt.tools) add(`tools\u0001${JSON.stringify(prompt.tools)}`);
      for (const m of prompt.messages.slice(0, MAX_KEYS)) {
        add(`${m.role}\u0001${m.content}${m.tool_calls ? JSON.stringify(m.tool_calls) : ""}`);
      }
      break;
    case "text":
      for (let i = 0; i + TEXT_CHUNK_CHARS <= prompt.text.length && keys.length < MAX_KEYS; i += TEXT_CHUNK_CHARS) {
        add(prompt.text.slice(i, i + TEXT_CHUNK_CHARS));
      }
      break;
    case "tokens":
      for (let i = 0; i + TOKEN_CHUNK <= prompt.token_ids.length && keys.length < MAX_KEYS; i += TOKEN_CHUNK) {
        add(prompt.token_ids.slice(i, i + TOKEN_CHUNK).join(","));
      }
      break;
  }
  return keys;
}

/**
 * The prefix-cache block hashes a worker computes for `tokenIds` (kv-cache-manager.ts `hashBlockTokens`:
 * sha256(parentHash as UTF-8, then the block's ids as little-endian int32), base64url, first 22 characters).
 */
export async function workerBlockHashes(
  tokenIds: readonly number[],
  blockSize: number,
  maxBlocks = 64,
): Promise<string[]> {
  const out: string[] = [];
  const enc = new TextEncoder();
  let parent = "";
  const numBlocks = Math.min(maxBlocks, Math.floor(Math.max(0, tokenIds.length - 1) / blockSize));
  for (let b = 0; b < numBlocks; b++) {
    const p = enc.encode(parent);
    const buf = new Uint8Array(p.byteLength + blockSize * 4);
    buf.set(p, 0);
    const view = new DataView(buf.buffer);
    for (let i = 0; i < blockSize; i++) view.setInt32(p.byteLength + i * 4, tokenIds[b * blockSize + i]!, true);
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
    parent = base64url(digest).slice(0, 22);
    out.push(parent);
  }
  return out;
}

function base64url(bytes: Uint8Array): string {
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// ---------------------------------------------------------------------------------------------------------------
// Workers, from their load reports

export interface WorkerState {
  report: LoadReport;
  receivedAt: number;
  /** Subject where the worker accepts requests addressed to it, if it advertises one (see PoolNames.direct). */
  directSubject?: string;
  /** Requests sent to it directly since its last report (the report does not count them yet). */
  sentSinceReport: number;
  blockHashes: Set<string>;
}

export class WorkerTable {
  readonly #workers = new Map<string, WorkerState>();
  readonly #now: () => number;
  readonly #staleMs: number;

  constructor(opts: { now?: () => number; staleMs?: number } = {}) {
    this.#now = opts.now ?? Date.now;
    this.#staleMs = opts.staleMs ?? 3 * LOAD_REPORT_INTERVAL_MS;
  }

  /** @param directSubject from the report's raw JSON (an addition the shared schema does not know yet) */
  update(report: LoadReport, directSubject?: string): void {
    this.#workers.set(report.worker_id, {
      report,
      receivedAt: this.#now(),
      directSubject,
      sentSinceReport: 0,
      blockHashes: new Set(report.prefix_cache.block_hashes),
    });
  }

  get(workerId: string): WorkerState | undefined {
    const w = this.#workers.get(workerId);
    if (!w) return undefined;
    if (this.#now() - w.receivedAt > this.#staleMs) {
      this.#workers.delete(workerId); // silent for three intervals: gone
      return undefined;
    }
    return w;
  }

  /** Live workers of a pool. */
  inPool(pool: string): WorkerState[] {
    return [...this.#workers.keys()].map((id) => this.get(id)).filter((w): w is WorkerState => w?.report.pool === pool);
  }

  /** Whether the worker could start one more request now. */
  hasRoom(w: WorkerState): boolean {
    const r = w.report;
    if (r.draining) return false;
    if (r.running + r.waiting + w.sentSinceReport >= r.max_num_seqs) return false;
    return r.kv_blocks_total === 0 || r.kv_blocks_free / r.kv_blocks_total >= KV_FREE_MIN;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Picking a worker

interface Learned {
  pool: string;
  workerId: string;
  at: number;
}

export class PrefixRouter {
  readonly #learned = new Map<string, Learned>();
  readonly #now: () => number;
  readonly table: WorkerTable;

  constructor(table: WorkerTable, now: () => number = Date.now) {
    this.table = table;
    this.#now = now;
  }

  /** Remembers that `workerId` now holds the prefixes `keys` (it just started a request with them). */
  learn(pool: string, keys: readonly string[], workerId: string): void {
    const at = this.#now();
    for (const k of keys) {
      this.#learned.delete(k); // re-insert: Map order is the LRU order
      this.#learned.set(k, { pool, workerId, at });
    }
    while (this.#learned.size > MAX_LEARNED) this.#learned.delete(this.#learned.keys().next().value!);
  }

  /**
   * The worker that caches the longest prefix of the prompt and has room for it, with the depth of the match
   * (in keys or blocks); undefined when none does: the request goes to the pool's queue.
   */
  async pick(
    pool: string,
    prompt: Prompt,
    keys: readonly string[],
  ): Promise<{ worker: WorkerState; depth: number } | undefined> {
    const exact = prompt.type === "tokens" ? await this.#fromReports(pool, prompt.token_ids) : undefined;
    const best = exact ?? this.#fromLearned(pool, keys);
    if (!best || !this.table.hasRoom(best.worker)) return undefined;
    return best;
  }

  async #fromReports(pool: string, tokenIds: number[]): Promise<{ worker: WorkerState; depth: number } | undefined> {
    let best: { worker: WorkerState; depth: number } | undefined;
    const byBlockSize = new Map<number, string[]>();
    for (const w of this.table.inPool(pool)) {
      const bs = w.report.prefix_cache.block_size;
      let hashes = byBlockSize.get(bs);
      if (!hashes) {
        hashes = await workerBlockHashes(tokenIds, bs);
        byBlockSize.set(bs, hashes);
      }
      // Reports list *some* cached blocks, so the deepest listed one counts (its prefix is cached with it).
      for (let d = hashes.length; d > 0; d--) {
        if (w.blockHashes.has(hashes[d - 1]!)) {
          if (!best || d > best.depth) best = { worker: w, depth: d };
          break;
        }
      }
    }
    return best;
  }

  #fromLearned(pool: string, keys: readonly string[]): { worker: WorkerState; depth: number } | undefined {
    const now = this.#now();
    for (let d = keys.length; d > 0; d--) {
      const hit = this.#learned.get(keys[d - 1]!);
      if (!hit || hit.pool !== pool || now - hit.at > LEARNED_TTL_MS) continue;
      const worker = this.table.get(hit.workerId);
      if (worker) return { worker, depth: d };
    }
    return undefined;
  }
}
