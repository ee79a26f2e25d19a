/**
 * What the HTTP app needs from key storage: metadata, the admin API and usage reports. Admission and settlement
 * are the `Limiter` (dispatch/job.ts); durable/durable-key-store.ts implements both over Durable Objects.
 *
 * @module
 */
import type { KeyCounters, RateInfo } from "./key-limiter.ts";
import type { CreateKeyInput, KeyInfo, KeyUpdate, UsageReport } from "./types.ts";

export type AuthResult = { ok: true; key: KeyInfo } | { ok: false; reason: "invalid_key" | "revoked" };

export interface KeyStore {
  /** The key whose SHA-256 is `keyHash`, if it exists and is not revoked. */
  authenticate(keyHash: string): Promise<AuthResult>;
  /** Creates a key; the returned `key` is the only time the secret exists outside the caller. */
  create(input: CreateKeyInput): Promise<{ key: string; info: KeyInfo }>;
  list(): Promise<KeyInfo[]>;
  get(id: string): Promise<KeyInfo | null>;
  update(id: string, patch: KeyUpdate): Promise<KeyInfo | null>;
  revoke(id: string): Promise<KeyInfo | null>;
  /** Usage by key id (admin) or by hash (the key itself). */
  usage(ref: { id: string } | { hash: string }, startDate: string, endDate: string): Promise<UsageReport | null>;
  rateInfo(keyHash: string): Promise<RateInfo>;
  /** Every key (revoked ones too: their counters still count) with its all-time counters, for /metrics. */
  counters(): Promise<{ info: KeyInfo; counters: KeyCounters }[]>;
}
