/**
 * `RequestCounters`: the gateway's request counts (see metrics/request-counts.ts) in Durable Object storage, split
 * over a few objects so that no single one takes every request's hand-over. Each isolate writes to one shard,
 * picked at random when it first counts; /metrics sums all of them.
 *
 * @module
 */
import { DurableObject } from "cloudflare:workers";
import type { RequestCounterStore, RequestCounts } from "../metrics/request-counts.ts";

/** Shards of the request counters. Changing it drops the counts of removed shards: a counter reset to Prometheus. */
export const REQUEST_COUNTER_SHARDS = 4;

export class RequestCounters extends DurableObject<unknown> {
  add(counts: RequestCounts): void {
    const kv = this.ctx.storage.kv;
    for (const [series, n] of Object.entries(counts)) kv.put(`c:${series}`, (kv.get<number>(`c:${series}`) ?? 0) + n);
  }

  counts(): RequestCounts {
    return Object.fromEntries([...this.ctx.storage.kv.list<number>({ prefix: "c:" })].map(([k, n]) => [k.slice(2), n]));
  }
}

export class DurableRequestCounters implements RequestCounterStore {
  readonly #ns: DurableObjectNamespace<RequestCounters>;
  readonly #name: string;
  #shard: number | undefined;

  /** `name`: the shards' name prefix (tests give each their own set). */
  constructor(ns: DurableObjectNamespace<RequestCounters>, opts: { name?: string } = {}) {
    this.#ns = ns;
    this.#name = opts.name ?? "requests";
  }

  #stub(shard: number): DurableObjectStub<RequestCounters> {
    return this.#ns.get(this.#ns.idFromName(`${this.#name}-${shard}`));
  }

  async add(counts: RequestCounts): Promise<void> {
    // Random per isolate, chosen lazily: Workers forbid randomness at module scope.
    this.#shard ??= Math.floor(Math.random() * REQUEST_COUNTER_SHARDS);
    await this.#stub(this.#shard).add(counts);
  }

  async counts(): Promise<RequestCounts> {
    const shards = await Promise.all(
      Array.from({ length: REQUEST_COUNTER_SHARDS }, async (_, i) => (await this.#stub(i).counts()) as RequestCounts),
    );
    const total: RequestCounts = {};
    for (const s of shards) for (const [k, n] of Object.entries(s)) total[k] = (total[k] ?? 0) + n;
    return total;
  }
}
