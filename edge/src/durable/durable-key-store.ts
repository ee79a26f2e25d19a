/**
 * `KeyStore` and `Limiter` over the `KeyState` (one per key hash) and `KeyDirectory` Durable Objects.
 *
 * @module
 */
import type { Limiter } from "../dispatch/job.ts";
import { keyHint } from "../errors.ts";
import { generateApiKey, generateKeyId, hashApiKey } from "../keys/api-key.ts";
import type { AdmitRequest, AdmitResult, KeyCounters, RateInfo } from "../keys/key-limiter.ts";
import type { AuthResult, KeyStore } from "../keys/key-store.ts";
import {
  type CreateKeyInput,
  CreateKeySchema,
  type KeyInfo,
  type KeyUpdate,
  type Settlement,
  UNLIMITED,
  type UsageReport,
} from "../keys/types.ts";
import type { DirectoryEntry, KeyDirectory, KeyState } from "./key-state.ts";

/** KeyStore and Limiter over the `KeyState` (one per key hash) and `KeyDirectory` Durable Objects. */
export class DurableKeyStore implements KeyStore, Limiter {
  readonly #keys: DurableObjectNamespace<KeyState>;
  readonly #directory: DurableObjectNamespace<KeyDirectory>;

  constructor(keys: DurableObjectNamespace<KeyState>, directory: DurableObjectNamespace<KeyDirectory>) {
    this.#keys = keys;
    this.#directory = directory;
  }

  #key(hash: string): DurableObjectStub<KeyState> {
    return this.#keys.get(this.#keys.idFromName(hash));
  }

  #dir(): DurableObjectStub<KeyDirectory> {
    return this.#directory.get(this.#directory.idFromName("directory"));
  }

  async #entry(id: string): Promise<DirectoryEntry | null> {
    return (await this.#dir().get(id)) as DirectoryEntry | null;
  }

  async authenticate(keyHash: string): Promise<AuthResult> {
    const info = (await this.#key(keyHash).info()) as KeyInfo | null;
    if (!info) return { ok: false, reason: "invalid_key" };
    if (info.revoked_at !== null) return { ok: false, reason: "revoked" };
    return { ok: true, key: info };
  }

  /**
   * The directory entry is written first: if creating the key's object then fails, the entry is removed again,
   * and if even that fails the key listed is one that does not authenticate. No failure leaves a working key that
   * cannot be listed or revoked.
   */
  async create(input: CreateKeyInput): Promise<{ key: string; info: KeyInfo }> {
    const parsed = CreateKeySchema.parse(input);
    const key = await generateApiKey();
    const hash = await hashApiKey(key);
    const info: KeyInfo = {
      id: generateKeyId(),
      object: "api_key",
      name: parsed.name,
      hint: keyHint(key),
      created_at: Math.floor(Date.now() / 1000),
      revoked_at: null,
      limits: parsed.limits ?? UNLIMITED,
    };
    await this.#dir().put({ hash, info });
    try {
      await this.#key(hash).create(info);
    } catch (e) {
      await this.#dir()
        .delete(info.id)
        .catch((d: unknown) => console.error(`key ${info.id}: removing the directory entry failed`, d));
      throw e;
    }
    return { key, info };
  }

  async list(): Promise<KeyInfo[]> {
    return (await this.#dir().list()) as KeyInfo[];
  }

  async get(id: string): Promise<KeyInfo | null> {
    const e = await this.#entry(id);
    return e ? ((await this.#key(e.hash).info()) as KeyInfo | null) : null;
  }

  async #mutate(id: string, f: (stub: DurableObjectStub<KeyState>) => Promise<KeyInfo | null>) {
    const e = await this.#entry(id);
    if (!e) return null;
    const info = await f(this.#key(e.hash));
    if (info) await this.#dir().put({ hash: e.hash, info }); // the directory's copy serves listings
    return info;
  }

  update(id: string, patch: KeyUpdate): Promise<KeyInfo | null> {
    return this.#mutate(id, async (s) => (await s.update(patch)) as KeyInfo | null);
  }

  revoke(id: string): Promise<KeyInfo | null> {
    return this.#mutate(id, async (s) => (await s.revoke()) as KeyInfo | null);
  }

  async usage(ref: { id: string } | { hash: string }, startDate: string, endDate: string): Promise<UsageReport | null> {
    const hash = "hash" in ref ? ref.hash : (await this.#entry(ref.id))?.hash;
    if (!hash) return null;
    return (await this.#key(hash).usage(startDate, endDate)) as UsageReport | null;
  }

  /** One call to the directory, then one to each key's object, all at once. */
  async counters(): Promise<{ info: KeyInfo; counters: KeyCounters }[]> {
    const entries = (await this.#dir().entries()) as DirectoryEntry[];
    return Promise.all(
      entries.map(async (e) => ({ info: e.info, counters: (await this.#key(e.hash).counters()) as KeyCounters })),
    );
  }

  async rateInfo(keyHash: string): Promise<RateInfo> {
    return (await this.#key(keyHash).rateInfo()) as RateInfo;
  }

  async admit(keyHash: string, req: AdmitRequest): Promise<AdmitResult> {
    return (await this.#key(keyHash).admit(req)) as AdmitResult;
  }

  async settle(keyHash: string, reservationId: string, settlement: Settlement): Promise<void> {
    await this.#key(keyHash).settle(reservationId, settlement);
  }

  async renew(keyHash: string, reservationId: string, progress: Settlement, leaseUntil: number): Promise<boolean> {
    return (await this.#key(keyHash).renew(reservationId, progress, leaseUntil)) as boolean;
  }
}
