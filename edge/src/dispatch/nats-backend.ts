/**
 * SubmitBackend over NATS with prefix affinity: a request whose prompt prefix a worker caches (and that has room
 * and takes addressed requests) is offered to that worker directly; everything else, and every refusal, goes to
 * the pool's JetStream queue. Both through the shared Dispatcher (`SubmitOptions.worker`).
 *
 * @module
 */
import type { DispatchEvent, SubmitOptions, SubmitRequest } from "@llama-edge/shared";
import { type PrefixRouter, prefixKeys } from "./affinity.ts";
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
    const { dispatcher } = await this.link.get(request.id);
    const keys = prefixKeys(request.prompt);
    const target = await this.router.pick(pool, request.prompt, keys);
    const worker = target?.worker.directSubject;
    if (target && worker) target.worker.sentSinceReport++; // until its next report counts it itself
    for await (const ev of dispatcher.submit(pool, request, { ...options, worker })) {
      if (ev.type === "start") {
        // Refused and queued, another worker took it: the offer did not add to the first one's load.
        if (target && worker && ev.worker_id !== target.worker.report.worker_id) target.worker.sentSinceReport--;
        this.router.learn(pool, keys, ev.worker_id);
      }
      yield ev;
    }
  }
}
