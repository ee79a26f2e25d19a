/**
 * The JSON the console reads from the gateway: the shapes edge/README.md documents for `GET /v1/models`,
 * `GET /v1/usage` and the admin API. The console speaks HTTP only, so it keeps its own copy of what it reads.
 *
 * @module
 */

/** A key's limits; `null` = unlimited. */
export interface Limits {
  rpm: number | null;
  tpm: number | null;
  max_concurrent: number | null;
  budget: { tokens: number; period: "day" | "month" } | null;
  models: string[] | null;
}

export interface KeyInfo {
  id: string;
  name: string;
  /** `sk-...abcd` */
  hint: string;
  /** Epoch seconds. */
  created_at: number;
  revoked_at: number | null;
  limits: Limits;
}

/** `POST /admin/keys`: the metadata plus the key itself, shown this once. */
export interface CreatedKey extends KeyInfo {
  key: string;
}

export interface UsageCounters {
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  cached_tokens: number;
}

export interface UsageRow extends UsageCounters {
  /** YYYY-MM-DD, UTC. */
  date: string;
  model: string;
}

export interface UsageReport {
  key_id: string;
  start_date: string;
  end_date: string;
  data: UsageRow[];
  totals: UsageCounters;
  budget: { period: "day" | "month"; tokens: number; used: number; reserved: number } | null;
}

/** `GET /v1/usage` adds the key it was asked with. */
export interface OwnUsageReport extends UsageReport {
  key: { id: string; name: string; hint: string; limits: Limits };
}

/** One window of OpenAI's `x-ratelimit-*` headers. */
export interface RateWindow {
  limit: number;
  remaining: number;
  /** OpenAI's duration format: "20ms", "6m0s". */
  reset: string;
}

/** What the rate-limit headers of a response say remains now; a window is absent when the key has no such limit. */
export interface RateState {
  requests?: RateWindow;
  tokens?: RateWindow;
}

export function rateStateFrom(headers: Headers): RateState {
  const window = (kind: "requests" | "tokens"): RateWindow | undefined => {
    const limit = headers.get(`x-ratelimit-limit-${kind}`);
    if (limit === null) return undefined;
    return {
      limit: Number(limit),
      remaining: Number(headers.get(`x-ratelimit-remaining-${kind}`)),
      reset: headers.get(`x-ratelimit-reset-${kind}`) ?? "",
    };
  };
  const state: RateState = {};
  const requests = window("requests");
  const tokens = window("tokens");
  if (requests) state.requests = requests;
  if (tokens) state.tokens = tokens;
  return state;
}

/** A UTC day as the usage API names it. */
export function utcDay(ms: number): string {
  return new Date(ms).toISOString().slice(0, 10);
}

/** The inclusive range of the last `days` UTC days, ending today. */
export function lastDays(days: number, now = Date.now()): { start: string; end: string } {
  return { start: utcDay(now - (days - 1) * 86_400_000), end: utcDay(now) };
}
