/**
 * One key's state machine: metadata, admission (RPM, TPM, concurrency, budget, models), settlement and the usage
 * ledger. Pure logic over a synchronous key-value store, so that inside the key's Durable Object a check and its
 * commit happen in one turn of the event loop: no other request can interleave, and a burst of 200 requests on a
 * 50 RPM key admits exactly 50. The Durable Object (durable/key-state.ts) only wires this to its storage.
 *
 * NOTE on reservations. Admission reserves what a request may use; settlement replaces that with what it used.
 * Whoever runs the request renews its reservation's lease while it runs, reporting the usage so far; a
 * reservation whose lease lapses (its runner died with its client) is settled by policy: charged the usage of its
 * last renewal, what had been delivered by then. A settlement arriving later charges the difference. So tokens
 * delivered are charged, a dead runner's concurrency slots come back within one lease, and nothing is dropped.
 * Usage counts in the day and budget period in which the request was admitted.
 *
 * Storage layout: `meta` (KeyInfo), `rpm:<slot>` (admission times), `tpm` (bucket), `res:<id>` (open
 * reservations), `lapsed:<id>` (reservations settled by policy, until a late settlement or their expiry),
 * `period:<day|month>` (budget tokens used), `usage:<YYYY-MM-DD>:<model>` (ledger rows), `refused:<limit>`
 * (429s per limit since the key was created: the gateway's /metrics).
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
  /** Tokens reserved against TPM: prompt estimate + the completion tokens allowed (or a default reserve). */
  tokens: number;
  /** Worker sequences the request runs (prompts × n): what max_concurrent counts. Default 1. */
  sequences?: number;
  /** What a budget must hold for the request; absent = `tokens`. */
  budget?: BudgetNeed;
  /** Until when the reservation stands without a renewal (see `renew`); absent = `expiresAt`. */
  leaseUntil?: number;
  /** When the reservation ends at the latest, renewed or not (the request's deadline plus a margin). */
  expiresAt: number;
}

/** The most a request can use, for a budget that must never be overshot. */
export interface BudgetNeed {
  /** Prompt tokens, at most (all prompts). */
  promptTokens: number;
  choices: number;
  /** Completion tokens per choice: the request's max_tokens, or null (until the context is full). */
  maxTokens: number | null;
  /** The largest context a choice may fill: bounds a choice without max_tokens. */
  maxContext: number;
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
  | "too_many_sequences"
  | "requests"
  | "tokens"
  | "request_too_large"
  | "quota";

/** The limit of a key (its field in `Limits`) that refused a request with a 429. */
export type RefusingLimit = "rpm" | "tpm" | "max_concurrent" | "budget";
export const REFUSING_LIMITS: readonly RefusingLimit[] = ["rpm", "tpm", "max_concurrent", "budget"];

const LIMIT_OF: Partial<Record<AdmitFailure, RefusingLimit>> = {
  requests: "rpm",
  tokens: "tpm",
  request_too_large: "tpm",
  concurrency: "max_concurrent",
  too_many_sequences: "max_concurrent",
  quota: "budget",
};

/** A key's counters for the gateway's /metrics: all-time, so they only ever grow. */
export interface KeyCounters {
  /** Ledger totals per model. */
  tokens: Record<string, { prompt_tokens: number; completion_tokens: number }>;
  /** 429s per limit (every limit present, 0 if it never refused). */
  refused: Record<RefusingLimit, number>;
}

export type AdmitResult =
  | {
      ok: true;
      reservationId: string;
      key: KeyInfo;
      rate: RateInfo;
      /** Set when the budget capped a request without max_tokens: its completion tokens per choice. */
      maxTokens?: number;
    }
  | { ok: false; reason: AdmitFailure; message: string; retryAfterMs?: number; rate?: RateInfo; key?: KeyInfo };

interface Reservation {
  /** Reserved against TPM. */
  tokens: number;
  /** Reserved against the budget (of the period `at` falls in). */
  budgetTokens: number;
  sequences: number;
  model: string;
  /** Admission time: the day and budget period the usage counts in. */
  at: number;
  leaseUntil: number;
  expiresAt: number;
  /** Usage so far, from the last renewal: what a lapsed reservation is charged. */
  progress?: Settlement;
}

/** A reservation settled by policy when its lease lapsed: what it was charged, for a late settlement. */
interface Lapsed {
  charged: Settlement;
  at: number;
  /** Dropped after this (a settlement cannot come later than the reservation's own expiry). */
  until: number;
}

interface Bucket {
  tokens: number;
  at: number;
}

export const utcDate = (ms: number): string => new Date(ms).toISOString().slice(0, 10);
const periodKey = (period: "day" | "month", ms: number): string =>
  `period:${period === "day" ? utcDate(ms) : utcDate(ms).slice(0, 7)}`;
/** How long a lapsed reservation waits for a late settlement past its expiry. */
const LAPSED_KEEP_MS = 10 * 60_000;
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
  #lapsed = new Map<string, Lapsed>();
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
    for (const [k, r] of this.#kv.list<
      Partial<Reservation> & Pick<Reservation, "tokens" | "model" | "at" | "expiresAt">
    >({
      prefix: "res:",
    })) {
      // Reservations stored before leases, sequences and budget bounds existed get the old meaning.
      this.#reservations.set(k.slice(4), {
        budgetTokens: r.tokens,
        sequences: 1,
        leaseUntil: r.expiresAt,
        ...r,
      });
    }
    for (const [k, l] of this.#kv.list<Lapsed>({ prefix: "lapsed:" })) this.#lapsed.set(k.slice(7), l);
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
    const fail = (reason: AdmitFailure, message: string, retryAfterMs?: number): AdmitResult => {
      const limit = LIMIT_OF[reason];
      if (limit) this.#kv.put(`refused:${limit}`, (this.#kv.get<number>(`refused:${limit}`) ?? 0) + 1, UNCONFIRMED);
      return { ok: false, reason, message, retryAfterMs, rate, key: meta };
    };

    if (limits.models && !limits.models.includes(req.model)) {
      return fail("model_not_allowed", `this key may not use model '${req.model}'`);
    }
    const sequences = req.sequences ?? 1;
    if (limits.max_concurrent !== null) {
      if (sequences > limits.max_concurrent) {
        return fail(
          "too_many_sequences",
          `This request runs ${sequences} sequences (prompts × n), more than the key's limit of ` +
            `${limits.max_concurrent} concurrent sequences. Lower n or send fewer prompts.`,
        );
      }
      const inUse = this.#sequencesInUse();
      if (inUse + sequences > limits.max_concurrent) {
        return fail(
          "concurrency",
          `Rate limit reached on concurrent sequences: Limit ${limits.max_concurrent}, In use ${inUse}, ` +
            `Requested ${sequences}.`,
          1000,
        );
      }
    }
    let budgetTokens = 0;
    let cappedMaxTokens: number | undefined;
    if (limits.budget) {
      const { tokens: total, period } = limits.budget;
      const used = this.#kv.get<number>(periodKey(period, now)) ?? 0;
      const reserved = this.#reservedBudget(period, now);
      const left = total - used - reserved;
      const need = req.budget ?? { promptTokens: req.tokens, choices: 1, maxTokens: 0, maxContext: 0 };
      budgetTokens = need.promptTokens + need.choices * (need.maxTokens ?? need.maxContext);
      if (budgetTokens > left && need.maxTokens === null) {
        // No max_tokens: run with what the budget has left rather than refuse (finish_reason "length" says so).
        const perChoice = Math.floor((left - need.promptTokens) / need.choices);
        if (perChoice >= 1) {
          cappedMaxTokens = perChoice;
          budgetTokens = need.promptTokens + need.choices * perChoice;
        }
      }
      if (budgetTokens > left) {
        return fail(
          "quota",
          `You exceeded your current quota: ${used} of ${total} tokens used this ${period}, ${reserved} reserved ` +
            `by requests in flight, and this request may use up to ${budgetTokens}.`,
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
    const r: Reservation = {
      tokens: req.tokens,
      budgetTokens,
      sequences,
      model: req.model,
      at: now,
      leaseUntil: Math.min(req.leaseUntil ?? req.expiresAt, req.expiresAt),
      expiresAt: req.expiresAt,
    };
    this.#reservations.set(reservationId, r);
    this.#kv.put(`res:${reservationId}`, r, UNCONFIRMED);
    return {
      ok: true,
      reservationId,
      key: meta,
      rate: this.rateInfo(now),
      ...(cappedMaxTokens !== undefined ? { maxTokens: cappedMaxTokens } : {}),
    };
  }

  /**
   * Extends a running request's lease and records its usage so far (what it is charged should its runner die).
   * False if the reservation is no longer open (settled, or lapsed: the runner may stop renewing).
   */
  renew(reservationId: string, progress: Settlement, leaseUntil: number): boolean {
    this.#load();
    const r = this.#reservations.get(reservationId);
    if (!r) return false;
    r.leaseUntil = Math.min(Math.max(r.leaseUntil, leaseUntil), r.expiresAt);
    r.progress = progress;
    this.#kv.put(`res:${reservationId}`, r, UNCONFIRMED);
    return true;
  }

  /**
   * Ends a reservation with the tokens actually used: frees its concurrency slots, returns unused TPM tokens,
   * counts the usage against the budget and in the ledger (in the period it was admitted in). For a reservation
   * that lapsed, charges what its policy settlement did not. Idempotent: a settled or unknown id returns false.
   */
  settle(reservationId: string, s: Settlement): boolean {
    this.#load();
    const r = this.#reservations.get(reservationId);
    if (r) {
      this.#reservations.delete(reservationId);
      this.#kv.delete(`res:${reservationId}`);
      this.#charge(s, r.at, r.tokens, 1);
      return true;
    }
    const lapsed = this.#lapsed.get(reservationId);
    if (!lapsed) return false;
    this.#lapsed.delete(reservationId);
    this.#kv.delete(`lapsed:${reservationId}`);
    const c = lapsed.charged;
    const more: Settlement = {
      model: s.model,
      prompt_tokens: Math.max(0, s.prompt_tokens - c.prompt_tokens),
      completion_tokens: Math.max(0, s.completion_tokens - c.completion_tokens),
      cached_tokens: Math.max(0, s.cached_tokens - c.cached_tokens),
    };
    this.#charge(more, lapsed.at, 0, 0);
    return true;
  }

  /** Counts `s` in the ledger and the budget periods of `at`; refunds the TPM tokens reserved beyond it. */
  #charge(s: Settlement, at: number, reservedTpm: number, requests: number): void {
    const used = s.prompt_tokens + s.completion_tokens;
    const limits = this.#meta?.limits;
    if (limits?.tpm != null) {
      const bucket = this.#bucket(limits.tpm, this.#now());
      // Refund what the reservation over-estimated (or charge what it under-estimated: the bucket may go negative).
      bucket.tokens = Math.min(limits.tpm, bucket.tokens + reservedTpm - used);
      this.#kv.put("tpm", bucket);
    }
    for (const period of ["day", "month"] as const) {
      const k = periodKey(period, at);
      this.#kv.put(k, (this.#kv.get<number>(k) ?? 0) + used);
    }
    const rowKey = `usage:${utcDate(at)}:${s.model}`;
    const row = this.#kv.get<UsageCounters>(rowKey) ?? emptyCounters();
    row.requests += requests;
    row.prompt_tokens += s.prompt_tokens;
    row.completion_tokens += s.completion_tokens;
    row.cached_tokens += s.cached_tokens;
    this.#kv.put(rowKey, row);
  }

  /**
   * Reservations whose lease lapsed (their runner died with its client, or stopped renewing) are settled by
   * policy: charged the usage of their last renewal (zero if none came), their slots freed.
   */
  #sweep(now: number): void {
    for (const [id, r] of this.#reservations) {
      if (r.leaseUntil > now) continue;
      const charged = r.progress ?? { model: r.model, prompt_tokens: 0, completion_tokens: 0, cached_tokens: 0 };
      this.#reservations.delete(id);
      this.#kv.delete(`res:${id}`);
      this.#charge(charged, r.at, r.tokens, 1);
      const lapsed: Lapsed = { charged, at: r.at, until: r.expiresAt + LAPSED_KEEP_MS };
      this.#lapsed.set(id, lapsed);
      this.#kv.put(`lapsed:${id}`, lapsed);
    }
    for (const [id, l] of this.#lapsed) {
      if (l.until > now) continue;
      this.#lapsed.delete(id);
      this.#kv.delete(`lapsed:${id}`);
    }
  }

  #sequencesInUse(): number {
    let sum = 0;
    for (const r of this.#reservations.values()) sum += r.sequences;
    return sum;
  }

  /** Budget tokens reserved by requests admitted in the current period (earlier ones count in theirs). */
  #reservedBudget(period: "day" | "month", now: number): number {
    const current = periodKey(period, now);
    let sum = 0;
    for (const r of this.#reservations.values()) if (periodKey(period, r.at) === current) sum += r.budgetTokens;
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
    const now = this.#now();
    this.#sweep(now);
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
        used: this.#kv.get<number>(periodKey(b.period, now)) ?? 0,
        reserved: this.#reservedBudget(b.period, now),
      },
    };
  }

  /** All-time token totals per model (summed from the ledger) and 429s per limit: the gateway's /metrics. */
  counters(): KeyCounters {
    this.#load();
    this.#sweep(this.#now());
    const tokens: KeyCounters["tokens"] = {};
    for (const [k, c] of this.#kv.list<UsageCounters>({ prefix: "usage:" })) {
      const model = k.slice(17);
      const t = tokens[model] ?? { prompt_tokens: 0, completion_tokens: 0 };
      t.prompt_tokens += c.prompt_tokens;
      t.completion_tokens += c.completion_tokens;
      tokens[model] = t;
    }
    const refused = Object.fromEntries(
      REFUSING_LIMITS.map((l) => [l, this.#kv.get<number>(`refused:${l}`) ?? 0]),
    ) as Record<RefusingLimit, number>;
    return { tokens, refused };
  }

  /** Requests admitted and not yet settled (lapsed leases count as settled). */
  get numOpenReservations(): number {
    this.#load();
    this.#sweep(this.#now());
    return this.#reservations.size;
  }
}
