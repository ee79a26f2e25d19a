/**
 * Creates a pool's JetStream stream and durable pull consumer if absent. Idempotent and race-safe: every worker of
 * the pool calls it at start, and an operator may have created both beforehand (their config then wins; we only
 * read back the consumer's ack_wait, which paces our in-progress acks).
 *
 * @module
 */

import { poolNames } from "@llama-edge/shared";
import {
  AckPolicy,
  DeliverPolicy,
  DiscardPolicy,
  type JetStreamManager,
  RetentionPolicy,
  StorageType,
} from "@nats-io/jetstream";
import { nanos } from "@nats-io/nats-core";

export interface PoolSetupOptions {
  /** How long a pulled request may go without an ack or in-progress signal before JetStream redelivers it. The
   *  worker signals in-progress every ackWait/3 while it runs a request. Default 30 s. */
  ackWaitMs?: number;
  /** Requests older than this are dropped from the stream (their deadline is long gone). Default 1 h. */
  maxAgeMs?: number;
  /** Deliveries before a request is given up (a request that crashes every worker must not loop). Default 10. */
  maxDeliver?: number;
  /** Requests the whole pool may hold at once, running or pulled. Default 100 000. */
  maxAckPending?: number;
  /** Stream replicas (3 in a production cluster). Default 1. */
  replicas?: number;
}

export interface PoolSetup {
  stream: string;
  consumer: string;
  /** The consumer's actual ack_wait in ms (ours, or the operator's if it existed). */
  ackWaitMs: number;
  created: { stream: boolean; consumer: boolean };
}

export async function ensurePool(jsm: JetStreamManager, pool: string, opts: PoolSetupOptions = {}): Promise<PoolSetup> {
  const names = poolNames(pool);
  const streamCreated = await ensure(
    () => jsm.streams.info(names.stream),
    () =>
      jsm.streams.add({
        name: names.stream,
        subjects: [names.requests],
        // Work queue: a request leaves the stream once a worker acks (or terms) it; the consumer's lag is the
        // number of requests queued + running, which is what KEDA scales on.
        retention: RetentionPolicy.Workqueue,
        storage: StorageType.File,
        discard: DiscardPolicy.Old,
        max_age: nanos(opts.maxAgeMs ?? 3_600_000),
        duplicate_window: nanos(120_000),
        num_replicas: opts.replicas ?? 1,
      }),
  );
  const consumerCreated = await ensure(
    () => jsm.consumers.info(names.stream, names.consumer),
    () =>
      jsm.consumers.add(names.stream, {
        durable_name: names.consumer,
        ack_policy: AckPolicy.Explicit,
        deliver_policy: DeliverPolicy.All,
        ack_wait: nanos(opts.ackWaitMs ?? 30_000),
        max_deliver: opts.maxDeliver ?? 10,
        // Requests stay ack-pending while they run, so this caps the pool's concurrency: keep it far above it.
        max_ack_pending: opts.maxAckPending ?? 100_000,
      }),
  );
  const info = await jsm.consumers.info(names.stream, names.consumer);
  return {
    stream: names.stream,
    consumer: names.consumer,
    ackWaitMs: (info.config.ack_wait ?? nanos(30_000)) / 1e6,
    created: { stream: streamCreated, consumer: consumerCreated },
  };
}

/** Returns true if it created the resource. A create that loses a race with another worker is fine. */
async function ensure(info: () => Promise<unknown>, create: () => Promise<unknown>): Promise<boolean> {
  try {
    await info();
    return false;
  } catch (e) {
    if (!isNotFound(e)) throw e;
  }
  try {
    await create();
    return true;
  } catch (e) {
    await info().catch(() => {
      throw e; // it still does not exist: the create error is the real one
    });
    return false;
  }
}

function isNotFound(e: unknown): boolean {
  const name = (e as Error)?.name;
  return name === "StreamNotFoundError" || name === "ConsumerNotFoundError";
}
