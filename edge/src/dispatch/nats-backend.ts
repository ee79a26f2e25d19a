/**
 * SubmitBackend over NATS with prefix affinity: a request whose prompt prefix a worker caches (and that has room
 * and takes addressed requests) is offered to that worker directly; everything else, and every refusal, goes to
 * the pool's JetStream queue through the shared Dispatcher.
 *
 * @module
 */
import type { DispatchEvent, SubmitOptions, SubmitRequest } from "@llama-edge/shared";
import { type PrefixRouter, prefixKeys } from "./affinity.ts";
import { openDirect } from "./direct.ts";
import type { SubmitBackend } from "./job.ts";
import type { NatsLink } from "./nats-link.ts";

export class NatsBackend implements SubmitBackend {
  constructor(
    private readonly link: NatsLink,
    readonly router: PrefixRouter,
  ) {}

  async *submit(
    pool: string,
    request: SubmitRequest,
    options: SubmitOptions & { signal: AbortSignal },
  ): AsyncGenerator<DispatchEvent> {
    const { nc, dispatcher } = await this.link.get(request.id);
    const keys = prefixKeys(request.prompt);
    let events: AsyncIterable<DispatchEvent> | null = null;
    let queued = request;
    const target = await this.router.pick(pool, request.prompt, keys);
    const subject = target?.worker.directSubject;
    if (target && subject) {
      target.worker.sentSinceReport++; // until its next report says so itself
      events = await openDirect(nc, subject, pool, request, {
        signal: options.signal,
        onCancelledFinal: options.onCancelledFinal,
      });
      if (!events) {
        target.worker.sentSinceReport--;
        queued = { ...request, id: `${request.id}-q` }; // the refused id may still start late: never reuse it
      }
    }
    events ??= dispatcher.submit(pool, queued, options);
    for await (const ev of events) {
      if (ev.type === "start") this.router.learn(pool, keys, ev.worker_id);
      yield ev;
    }
  }
}
