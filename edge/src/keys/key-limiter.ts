/**
 * One key's state machine: metadata, admission (RPM, TPM, concurrency, budget, models), settlement and the usage
 * ledger. Pure logic over a synchronous key-value store, so that inside the key's Durable Object a check and its
 * commit happen in one turn of the event loop: no other request can interleave, and a burst of 200 requests on a
 * 50 RPM key admits exactly 50. The Durable Object (durable/key-state.ts) only wires this to its storage.
 *
 * Storage layout: `meta` (KeyInfo), `rpm:<slot>` (admission times), `tpm` (bucket), `res:<id>` (open
 * reservations), `period:<day|month>` (budget tokens used), `usage:<YYYY-MM-DD>:<model>` (ledger rows).
 *
 * @module
 */
import { randomBase62 } from "./api-key.ts";
import {
  emptyCounters,
  type KeyInfo,
  type KeyUpdate,
  type Limits,
  type Settlement,
  type UsageCounters,
  type UsageReport,
  type UsageRow,
} from "./types.ts";

/** The subset of Durable Objects' `ctx.storage.kv` (SyncKvStorage) the limiter uses. */
export interface KvStore {
  get<T = unknown>(key: string): T | undefined;
  /**
   * `unconfirmed`: the caller's answer need not wait until the write is durable (Durable Objects'
   * allowUnconfirmed). Used for admission state, where losing the last writes in a crash only forgets a few
   * rate-limit entries, and waiting for durability would add a disk flush to every request's latency.
   */
  put<T>(key: string, value: T, opts?: { unconfirmed?: boolean }): void;
  delete(key: string): boolean;
  list<T = unknown>(options?: { prefix?: string }): Iterable<[string, T]>;
}

export const WINDOW_MS = 60_000;

export interface AdmitRequest {
  model: string;
  /** Tokens reserved against TPM and the budget: prompt estimate + the completion tokens allowed. */
  tokens: number;
  /** When the reservation is dropped if never settled (the request's deadline plus a margin). */
  expiresAt: number;
}

/** What OpenAI's x-ratelimit-* headers report, per dimension that has a limit. */
export interface RateInfo {
  requests?: { limit: number; remaining: number; resetMs: number };
  tokens?: { limit: number; remaining: number; resetMs: number };
}

export type AdmitFailure =
  | "invalid_key"
  | "revoked"
  | "model_not_allowed"
  | "concurrency"
  | "requests"
  | "tokens"
  | "request_too_large"
  | "quota";

export type AdmitResult =
  | { ok: true; reservationId: string; key: KeyInfo; rate: RateInfo }
  | { ok: false; reason: AdmitFailure; message: string; retryAfterMs?: number; rate?: RateInfo; key?: KeyInfo };

interface Reservation {
  tokens: number;
  model: string;
  at: number;
  expiresAt: number;
}

interface Bucket {
  tokens: number;
  at: number;
}

export const utcDate = (ms: number): string => new Date(ms).toISOString().slice(0, 10);
const periodKey = (period: "day" | "month", ms: number): string =>
  `period:${period === "day" ? utcDate(ms) : utcDate(ms).slice(0, 7)}`;
const UNCONFIRMED = { unconfirmed: true };
const slotKey = (i: number): string => `rpm:${String(i).padStart(6, "0")}`;

export class KeyLimiter {
  readonly #kv: KvStore;
  readonly #now: () => number;
  #meta: KeyInfo | undefined;
  /** Admission times, a ring of `rpm` entries; #ring[#head] is the oldest, 0 when unused. */
  #ring: number[] = [];
  #head = 0;
  #reservations = new Map<string, Reservation>();
  #loaded = false;

  constructor(kv: KvStore, now: () => number = Date.now) {
    this.#kv = kv;
    this.#now = now;
  }

  #load(): void {
    if (this.#loaded) return;
    this.#loaded = true;
    this.#meta = this.#kv.get<KeyInfo>("meta");
    const slots = [...this.#kv.list<number>({ prefix: "rpm:" })];
    for (const [k] of slots) this.#kv.delete(k); // rewritten in time order by #resetRing
    this.#resetRing(
      this.#meta?.limits.rpm ?? 0,
      slots.map(([, t]) => t),
    );
    for (const [k, r] of this.#kv.list<Reservation>({ prefix: "res:" })) this.#reservations.set(k.slice(4), r);
  }

  /** Rebuilds the ring for a (new) RPM limit, keeping the most recent admission times. */
  #resetRing(size: number, times: number[]): void {
    for (let i = 0; i < this.#ring.length; i++) this.#kv.delete(slotKey(i));
    const recent = times
      .filter((t) => t > 0)
      .sort((a, b) => a - b)
      .slice(-size);
    this.#ring = Array.from({ length: size }, (_, i) => recent[i - (size - recent.length)] ?? 0);
    this.#head = 0;
    // With `recent` right-aligned, slot 0 (#head) holds the oldest entry: the ring stays in time order from #head.
    this.#ring.forEach((t, i) => {
      if (t > 0) this.#kv.put(slotKey(i), t);
    });
  }

  // -------------------------------------------------------------------------------------------------------------
  // Metadata

  info(): KeyInfo | undefined {
    this.#load();
    return this.#meta;
  }

  /** Stores a new key's metadata. Creating an existing key is a programming error (ids and hashes are random). */
  create(info: KeyInfo): void {
    this.#load();
    if (this.#meta) throw new Error(`key ${info.id} already exists`);
    this.#meta = info;
    this.#kv.put("meta", info);
    this.#resetRing(info.limits.rpm ?? 0, []);
  }

  update(patch: KeyUpdate): KeyInfo | undefined {
    this.#load();
    if (!this.#meta) return undefined;
    const limits: Limits = { ...this.#meta.limits, ...patch.limits };
    const rpmChanged = limits.rpm !== this.#meta.limits.rpm;
    this.#meta = { ...this.#meta, name: patch.name ?? this.#meta.name, limits };
    this.#kv.put("meta", this.#meta);
    if (rpmChanged) this.#resetRing(limits.rpm ?? 0, this.#ring);
    if (patch.limits?.tpm !== undefined) this.#kv.delete("tpm"); // a new TPM limit starts with a full bucket
    return this.#meta;
  }

  revoke(): KeyInfo | undefined {
    this.#load();
    if (!this.#meta) return undefined;
    this.#meta = { ...this.#meta, revoked_at: this.#meta.revoked_at ?? Math.floor(this.#now() / 1000) };
    this.#kv.put("meta", this.#meta);
    return this.#meta;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Admission

  /**
   * Checks every limit and, only if all pass, commits the request (RPM slot, TPM tokens, concurrency slot, budget
   * reservation) under a new reservation id. Synchronous on purpose: see the module comment.
   */
  admit(req: AdmitRequest): AdmitResult {
    this.#load();
    const meta = this.#meta;
    if (!meta) return { ok: false, reason: "invalid_key", message: "unknown key" };
    if (meta.revoked_at !== null) return { ok: false, reason: "revoked", message: "revoked", key: meta };
    const now = this.#now();
    this.#sweep(now);
    const { limits } = meta;
    const rate = this.rateInfo(now);
    const fail = (reason: AdmitFailure, message: string, retryAfterMs?: number): AdmitResult => ({
      ok: false,
      reason,
      message,
      retryAfterMs,
      rate,
      key: meta,
    });

    if (limits.models && !limits.models.includes(req.model)) {
      return fail("model_not_allowed", `this key may not use model '${req.model}'`);
    }
    if (limits.max_concurrent !== null && this.#reservations.size >= limits.max_concurrent) {
      return fail(
        "concurrency",
        `Rate limit reached on concurrent requests: Limit ${limits.max_concurrent}, In use ${this.#reservations.size}.`,
        1000,
      );
    }
    if (limits.budget) {
      const used = this.#kv.get<number>(periodKey(limits.budget.period, now)) ?? 0;
      const reserved = this.#reservedTokens();
      if (used + reserved >= limits.budget.tokens) {
        return fail(
          "quota",
          `You exceeded your current quota: ${used} of ${limits.budget.tokens} tokens this ${limits.budget.period} ` +
            `(${reserved} more reserved by requests in flight).`,
        );
      }
    }
    if (limits.rpm !== null) {
      const oldest = this.#ring[this.#head] ?? 0;
      if (oldest > now - WINDOW_MS) {
        return fail(
          "requests",
          `Rate limit reached on requests per min (RPM): Limit ${limits.rpm}, Used ${limits.rpm}, Requested 1.`,
          oldest + WINDOW_MS - now,
        );
      }
    }
    let bucket: Bucket | undefined;
    if (limits.tpm !== null) {
      if (req.tokens > limits.tpm) {
        return fail(
          "request_too_large",
          `Request too large for tokens per min (TPM): Limit ${limits.tpm}, Requested ${req.tokens}. ` +
            "Lower max_tokens or the prompt length.",
        );
      }
      bucket = this.#bucket(limits.tpm, now);
      if (bucket.tokens < req.tokens) {
        const perMs = limits.tpm / WINDOW_MS;
        return fail(
          "tokens",
          `Rate limit reached on tokens per min (TPM): Limit ${limits.tpm}, Remaining ${Math.floor(bucket.tokens)}, ` +
            `Requested ${req.tokens}.`,
          Math.ceil((req.tokens - bucket.tokens) / perMs),
        );
      }
    }

    // Every check passed: commit.
    if (limits.rpm !== null) {
      this.#ring[this.#head] = now;
      this.#kv.put(slotKey(this.#head), now, UNCONFIRMED);
      this.#head = (this.#head + 1) % limits.rpm;
    }
    if (bucket && limits.tpm !== null) {
      bucket.tokens -= req.tokens;
      this.#kv.put("tpm", bucket, UNCONFIRMED);
    }
    const reservationId = randomBase62(16);
    const r: Reservation = { tokens: req.tokens, model: req.model, at: now, expiresAt: req.expiresAt };
    this.#reservations.set(reservationId, r);
    this.#kv.put(`res:${reservationId}`, r, UNCONFIRMED);
    return { ok: true, reservationId, key: meta, rate: this.rateInfo(now) };
  }

  /**
   * Ends a reservation with the tokens actually used: frees its concurrency slot, returns unused TPM tokens,
   * counts the usage against the budget and in the ledger. Idempotent: an unknown or settled id returns false.
   */
  settle(reservationId: string, s: Settlement): boolean {
    this.#load();
    const r = this.#reservations.get(reservationId);
    if (!r) return false;
    this.#reservations.delete(reservationId);
    this.#kv.delete(`res:${reservationId}`);
    const now = this.#now();
    const used = s.prompt_tokens + s.completion_tokens;
    const limits = this.#meta?.limits;
    if (limits?.tpm != null) {
      const bucket = this.#bucket(limits.tpm, now);
      // Refund what the reservation over-estimated (or charge what it under-estimated: the bucket may go negative).
      bucket.tokens = Math.min(limits.tpm, bucket.tokens + r.tokens - used);
      this.#kv.put("tpm", bucket);
    }
    for (const period of ["day", "month"] as const) {
      const k = periodKey(period, now);
      this.#kv.put(k, (this.#kv.get<number>(k) ?? 0) + used);
    }
    const rowKey = `usage:${utcDate(now)}:${s.model}`;
    const row = this.#kv.get<UsageCounters>(rowKey) ?? emptyCounters();
    row.requests += 1;
    row.prompt_tokens += s.prompt_tokens;
    row.completion_tokens += s.completion_tokens;
    row.cached_tokens += s.cached_tokens;
    this.#kv.put(rowKey, row);
    return true;
  }

  /** Reservations past their expiry were never settled (their dispatcher died): free them. */
  #sweep(now: number): void {
    for (const [id, r] of this.#reservations) {
      if (r.expiresAt <= now) {
        this.#reservations.delete(id);
        this.#kv.delete(`res:${id}`);
      }
    }
  }

  #reservedTokens(): number {
    let sum = 0;
    for (const r of this.#reservations.values()) sum += r.tokens;
    return sum;
  }

  /** The TPM bucket refilled up to `now` (capacity `tpm`, refilling `tpm` per minute). */
  #bucket(tpm: number, now: number): Bucket {
    const stored = this.#kv.get<Bucket>("tpm") ?? { tokens: tpm, at: now };
    const tokens = Math.min(tpm, stored.tokens + ((now - stored.at) * tpm) / WINDOW_MS);
    return { tokens, at: now };
  }

  /** Admissions in the current window, from the ring (entries are in time order starting at #head). */
  #inWindow(now: number): { count: number; newest: number } {
    let count = 0;
    let newest = 0;
    for (const t of this.#ring) {
      if (t > now - WINDOW_MS) {
        count++;
        newest = Math.max(newest, t);
      }
    }
    return { count, newest };
  }

  rateInfo(now = this.#now()): RateInfo {
    this.#load();
    const limits = this.#meta?.limits;
    const info: RateInfo = {};
    if (limits?.rpm != null) {
      const { count, newest } = this.#inWindow(now);
      info.requests = {
        limit: limits.rpm,
        remaining: limits.rpm - count,
        resetMs: count === 0 ? 0 : newest + WINDOW_MS - now,
      };
    }
    if (limits?.tpm != null) {
      const b = this.#bucket(limits.tpm, now);
      info.tokens = {
        limit: limits.tpm,
        remaining: Math.max(0, Math.floor(b.tokens)),
        resetMs: Math.ceil(((limits.tpm - b.tokens) * WINDOW_MS) / limits.tpm),
      };
    }
    return info;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Usage

  /** Ledger rows between two dates (inclusive, YYYY-MM-DD), oldest first, with totals and the budget state. */
  usage(startDate: string, endDate: string): UsageReport | undefined {
    this.#load();
    if (!this.#meta) return undefined;
    const data: UsageRow[] = [];
    const totals = emptyCounters();
    for (const [k, c] of this.#kv.list<UsageCounters>({ prefix: "usage:" })) {
      const date = k.slice(6, 16);
      if (date < startDate || date > endDate) continue;
      data.push({ date, model: k.slice(17), ...c });
      totals.requests += c.requests;
      totals.prompt_tokens += c.prompt_tokens;
      totals.completion_tokens += c.completion_tokens;
      totals.cached_tokens += c.cached_tokens;
    }
    const b = this.#meta.limits.budget;
    return {
      object: "usage",
      key_id: this.#meta.id,
      start_date: startDate,
      end_date: endDate,
      data,
      totals,
      budget: b && {
        period: b.period,
        tokens: b.tokens,
        used: this.#kv.get<number>(periodKey(b.period, this.#now())) ?? 0,
        reserved: this.#reservedTokens(),
      },
    };
  }

  /** Requests admitted and not yet settled. */
  get numOpenReservations(): number {
    this.#load();
    return this.#reservations.size;
  }
}
