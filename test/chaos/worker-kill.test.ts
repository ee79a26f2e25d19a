/**
 * kill -9 a worker mid-stream, 20 times: every stream on it ends with the protocol's `worker_lost` error event
 * within 3 s, the streams on the other worker complete, nothing hangs, the key's reservations and concurrency
 * slots come back, the gateway and nats-server keep running, and each worker the supervisor starts again serves.
 *
 * The stack runs two workers; each round starts once the worker killed in the last one serves again.
 */
import { expect, inject, it } from "vitest";
import { admin } from "../../edge/dev/gateway.mjs";
import { logOffset, pidOf, secrets, waitForLog } from "../helpers/local-stack.ts";
import { chatOnce, client, type StreamOutcome, watchStream } from "../helpers/openai-streams.ts";

const stack = inject("stack");
const gw = { url: stack.url, port: 0, adminSecret: secrets(stack).adminSecret, stop: async () => {} };
const MODEL = "stories15m-random";
const WORKERS = ["default-0", "default-1"];
const ROUNDS = 20;
const STREAMS = 4;
/** Nothing may take longer than this to end once its worker is gone. */
const HANG_MS = 30_000;

const bounded = (p: Promise<StreamOutcome>, what: string) =>
  Promise.race([p, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what} hung`)), HANG_MS))]);

it(
  `ends every stream on a worker killed mid-stream with worker_lost, ${ROUNDS} times`,
  async () => {
    const { key, id } = (await admin(gw, "POST", "/keys", {
      name: "chaos-kill",
      limits: { max_concurrent: STREAMS, budget: { tokens: 1_000_000_000, period: "day" } },
    })) as { key: string; id: string };
    const openai = client(stack.url, key);
    const steady = { nats: pidOf(stack, "nats-server"), gateway: pidOf(stack, "gateway") };
    const latencies: number[] = [];
    /** Per worker: killed (log offset of the kill) and not yet seen serving since. */
    const awaitingService = new Map<string, number>();

    let lastKill: { worker: string; offset: number } | undefined;
    for (let round = 0; round < ROUNDS; round++) {
      // Both workers serving before the streams start: with one still restarting, its share of the streams waits in
      // the queue (a redelivery after ack_wait) while the other completes, and the round tests nothing.
      if (lastKill) await waitForLog(stack, new RegExp(`worker ${lastKill.worker}: ready`), lastKill.offset, 120_000);
      const streams = await Promise.all(
        Array.from({ length: STREAMS }, (_, i) =>
          watchStream(openai, {
            model: MODEL,
            messages: [{ role: "user", content: `Round ${round}, story ${i}` }],
            max_tokens: 230,
            ignore_eos: true,
          }),
        ),
      );
      await Promise.all(streams.map((s) => s.firstToken));
      for (const s of streams) awaitingService.delete(s.worker ?? "");
      // The victim: the worker of the first stream (the other one may still be loading after its own kill).
      const victim = streams[0]!.worker!;
      expect(WORKERS).toContain(victim);
      awaitingService.set(victim, logOffset(stack));
      lastKill = { worker: victim, offset: logOffset(stack) };
      const killedAt = Date.now();
      process.kill(pidOf(stack, `worker ${victim}`), "SIGKILL");

      const outcomes = await Promise.all(streams.map((s) => bounded(s.outcome, `round ${round}: a stream`)));
      outcomes.forEach((o, i) => {
        if (streams[i]!.worker === victim) {
          expect(o.error, `round ${round}`).toMatchObject({ code: "worker_lost", type: "server_error" });
          expect(o.endedAt - killedAt, `round ${round}`).toBeLessThan(3000);
          latencies.push(o.endedAt - killedAt);
        } else {
          expect(o.error, `round ${round}`).toBeUndefined();
          expect(o.finishReason, `round ${round}`).toBe("length");
        }
      });
      // Settled before the error event went out: nothing stays reserved, and every slot of the key is free again.
      const usage = (await admin(gw, "GET", `/keys/${id}/usage`)) as { budget: { reserved: number } };
      expect(usage.budget.reserved, `round ${round}`).toBe(0);
      const after = await Promise.all(
        Array.from({ length: STREAMS }, () => bounded(chatOnce(openai, { model: MODEL, max_tokens: 2 }), "a request")),
      );
      for (const a of after) expect(a.error, `round ${round}`).toBeUndefined();
      expect([pidOf(stack, "nats-server"), pidOf(stack, "gateway")], `round ${round}`).toEqual([
        steady.nats,
        steady.gateway,
      ]);
    }

    // Both workers back, and each one killed but not seen serving since serves now: with the others paused it is
    // the only one that can take the request.
    for (const [worker, offset] of awaitingService) {
      await waitForLog(stack, new RegExp(`worker ${worker}: ready`), offset, 120_000);
      const others = WORKERS.filter((w) => w !== worker).map((w) => pidOf(stack, `worker ${w}`));
      for (const pid of others) process.kill(pid, "SIGSTOP");
      try {
        const res = await chatOnce(openai, { model: MODEL, max_tokens: 2 });
        expect(res.error, `${worker} serves again`).toBeUndefined();
        expect(res.worker, `${worker} serves again`).toBe(worker);
      } finally {
        for (const pid of others) process.kill(pid, "SIGCONT");
      }
    }

    latencies.sort((a, b) => a - b);
    console.log(
      `worker kill: ${ROUNDS} kills, ${latencies.length} streams cut, error event after ` +
        `${latencies[0]}–${latencies.at(-1)} ms (p50 ${latencies[Math.floor(latencies.length / 2)]} ms)`,
    );
  },
  30 * 60_000,
);
