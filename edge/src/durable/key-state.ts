/**
 * One Durable Object per API key, named by the key's SHA-256: its metadata, limits, rate-limit state and usage
 * ledger live together, so every check is strongly consistent and costs one round trip, revocation applies to the
 * very next request, and limits cannot be multiplied by the number of gateway instances (there is exactly one
 * instance of each key's state in the world). The logic is `KeyLimiter`; this class only exposes it over RPC.
 *
 * `KeyDirectory` is the admin API's index (key id -> hash and a copy of the metadata), one instance for the
 * whole gateway: only admin calls touch it, never the request path.
 *
 * @module
 */
import { DurableObject } from "cloudflare:workers";
import {
  type AdmitRequest,
  type AdmitResult,
  type KeyCounters,
  KeyLimiter,
  type KvStore,
  type RateInfo,
} from "../keys/key-limiter.ts";
import type { KeyInfo, KeyUpdate, Settlement, UsageReport } from "../keys/types.ts";

/**
 * The limiter's store over the object's SQLite storage. Writes marked unconfirmed (admission state) are held in
 * memory and written in a later turn of the event loop: committing them in the admission's own turn would make
 * every request wait for a storage commit (~1 ms locally, measured), the largest cost on the edge's TTFT path.
 * Reads see held writes at once. A crash can lose the last few ms of rate-limit entries, never usage or metadata.
 */
class WriteBehindKv implements KvStore {
  readonly #kv: SyncKvStorage;
  readonly #held = new Map<string, unknown>();
  #flushScheduled = false;

  constructor(storage: DurableObjectStorage) {
    this.#kv = storage.kv;
  }

  get<T>(key: string): T | undefined {
    return (this.#held.has(key) ? structuredClone(this.#held.get(key)) : this.#kv.get<T>(key)) as T | undefined;
  }

  list<T>(options?: { prefix?: string }): Iterable<[string, T]> {
    const merged = new Map<string, T>(this.#kv.list<T>(options));
    for (const [k, v] of this.#held) if (!options?.prefix || k.startsWith(options.prefix)) merged.set(k, v as T);
    return [...merged].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  }

  put<T>(key: string, value: T, opts?: { unconfirmed?: boolean }): void {
    if (!opts?.unconfirmed) {
      this.#held.delete(key);
      this.#kv.put(key, value);
      return;
    }
    this.#held.set(key, structuredClone(value));
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      setTimeout(() => this.flush(), 0);
    }
  }

  delete(key: string): boolean {
    const held = this.#held.delete(key);
    return this.#kv.delete(key) || held;
  }

  flush(): void {
    this.#flushScheduled = false;
    for (const [k, v] of this.#held) this.#kv.put(k, v);
    this.#held.clear();
  }
}

export class KeyState extends DurableObject<unknown> {
  readonly #limiter: KeyLimiter;

  constructor(ctx: DurableObjectState, env: unknown) {
    super(ctx, env);
    this.#limiter = new KeyLimiter(new WriteBehindKv(ctx.storage));
  }

  create(info: KeyInfo): KeyInfo {
    this.#limiter.create(info);
    return info;
  }

  info(): KeyInfo | null {
    return this.#limiter.info() ?? null;
  }

  update(patch: KeyUpdate): KeyInfo | null {
    return this.#limiter.update(patch) ?? null;
  }

  revoke(): KeyInfo | null {
    return this.#limiter.revoke() ?? null;
  }

  admit(req: AdmitRequest): AdmitResult {
    return this.#limiter.admit(req);
  }

  settle(reservationId: string, settlement: Settlement): boolean {
    return this.#limiter.settle(reservationId, settlement);
  }

  renew(reservationId: string, progress: Settlement, leaseUntil: number): boolean {
    return this.#limiter.renew(reservationId, progress, leaseUntil);
  }

  rateInfo(): RateInfo {
    return this.#limiter.rateInfo();
  }

  usage(startDate: string, endDate: string): UsageReport | null {
    return this.#limiter.usage(startDate, endDate) ?? null;
  }

  counters(): KeyCounters {
    return this.#limiter.counters();
  }

  /** Open reservations (tests and debugging: a leak shows up here). */
  openReservations(): number {
    return this.#limiter.numOpenReservations;
  }
}

export interface DirectoryEntry {
  hash: string;
  info: KeyInfo;
}

export class KeyDirectory extends DurableObject<unknown> {
  put(entry: DirectoryEntry): void {
    this.ctx.storage.kv.put(`key:${entry.info.id}`, entry);
  }

  delete(id: string): void {
    this.ctx.storage.kv.delete(`key:${id}`);
  }

  get(id: string): DirectoryEntry | null {
    return this.ctx.storage.kv.get<DirectoryEntry>(`key:${id}`) ?? null;
  }

  list(): KeyInfo[] {
    return this.entries().map((e) => e.info);
  }

  /** Every key with its hash (the name of its `KeyState`), oldest first. */
  entries(): DirectoryEntry[] {
    return [...this.ctx.storage.kv.list<DirectoryEntry>({ prefix: "key:" })]
      .map(([, e]) => e)
      .sort((a, b) => a.info.created_at - b.info.created_at);
  }
}
