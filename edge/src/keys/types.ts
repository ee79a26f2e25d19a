/**
 * API keys as the gateway stores them: metadata, limits and usage. Only the SHA-256 of a key is ever stored; the
 * key itself is returned once, by the admin API call that creates it.
 *
 * @module
 */
import { z } from "zod";

const count = z.number().int().min(1);

/** RPM is an exact sliding window: the key keeps one timestamp per allowed request (in memory and storage), and
 *  every admission scans them. Above this, use null (unlimited) or a TPM limit. */
export const MAX_RPM = 10_000;

/** Limits of one key, as sent in a partial update: a field left out keeps its value, `null` = unlimited. */
export const LimitsPatchSchema = z.object({
  /** Requests per minute (sliding 60 s window, exact). */
  rpm: count.max(MAX_RPM).nullable().optional(),
  /** Tokens per minute: prompt estimate + max tokens reserved at admission, settled to the actual count. */
  tpm: count.nullable().optional(),
  /** Requests running at once (streaming or not). */
  max_concurrent: count.nullable().optional(),
  /** Prompt + completion tokens per calendar period (UTC). */
  budget: z
    .object({ tokens: count, period: z.enum(["day", "month"]) })
    .nullable()
    .optional(),
  /** Model names this key may use; null = every model the gateway serves. */
  models: z.array(z.string().min(1)).nullable().optional(),
});

/** Limits of one key. `null` = unlimited. */
export const LimitsSchema = LimitsPatchSchema.transform(
  (l): Limits => ({
    rpm: l.rpm ?? null,
    tpm: l.tpm ?? null,
    max_concurrent: l.max_concurrent ?? null,
    budget: l.budget ?? null,
    models: l.models ?? null,
  }),
);
export interface Limits {
  rpm: number | null;
  tpm: number | null;
  max_concurrent: number | null;
  budget: { tokens: number; period: "day" | "month" } | null;
  models: string[] | null;
}

export const UNLIMITED: Limits = { rpm: null, tpm: null, max_concurrent: null, budget: null, models: null };

/** What the admin API creates a key from. */
export const CreateKeySchema = z.object({
  name: z.string().max(200).default(""),
  limits: LimitsSchema.optional(),
});
export type CreateKeyInput = z.input<typeof CreateKeySchema>;

/** What the admin API updates: the name and any subset of the limits. */
export const UpdateKeySchema = z.object({
  name: z.string().max(200).optional(),
  limits: LimitsPatchSchema.optional(),
});
export type KeyUpdate = z.infer<typeof UpdateKeySchema>;

/** A key's metadata, as the admin API and `GET /v1/usage` show it. */
export interface KeyInfo {
  /** `key_...`: how the admin API names the key (the key itself is never stored). */
  id: string;
  object: "api_key";
  name: string;
  /** `sk-...abcd`, to recognise the key. */
  hint: string;
  /** Epoch seconds. */
  created_at: number;
  /** Epoch seconds, or null while the key is active. */
  revoked_at: number | null;
  limits: Limits;
}

/** Token counts of one model on one day (UTC) for one key. */
export interface UsageCounters {
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  cached_tokens: number;
}

export interface UsageRow extends UsageCounters {
  /** YYYY-MM-DD (UTC). */
  date: string;
  model: string;
}

export interface UsageReport {
  object: "usage";
  key_id: string;
  /** Inclusive date range of `data`. */
  start_date: string;
  end_date: string;
  data: UsageRow[];
  totals: UsageCounters;
  /** Tokens counted against the budget in the current period, if the key has one. */
  budget: { period: "day" | "month"; tokens: number; used: number; reserved: number } | null;
}

export const emptyCounters = (): UsageCounters => ({
  requests: 0,
  prompt_tokens: 0,
  completion_tokens: 0,
  cached_tokens: 0,
});

/** The result of settling one request's tokens with its key. */
export interface Settlement {
  model: string;
  prompt_tokens: number;
  completion_tokens: number;
  cached_tokens: number;
}
