/**
 * nats-server dies under load (kill -9) and the supervisor starts it again on the same ports and JetStream store,
 * as a StatefulSet would: every stream in flight ends (with an error event, or complete if its events got through
 * the gap; never cut off silently, never hanging), and new requests succeed within 5 s of the server's return.
 */
import { expect, inject, it } from "vitest";
import { logOffset, pidOf, secrets, waitForLog } from "../helpers/local-stack.ts";
import { chatOnce, client, type StreamOutcome, watchStream } from "../helpers/openai-streams.ts";

const stack = inject("stack");
const MODEL = "stories15m-random";
const HANG_MS = 30_000;

it("recovers from a nats-server restart under load", async () => {
  const openai = client(stack.url, secrets(stack).key);
  const streams = await Promise.all(
    Array.from({ length: 8 }, (_, i) =>
      watchStream(openai, {
        model: MODEL,
        messages: [{ role: "user", content: `Story ${i}` }],
        max_tokens: 230,
        ignore_eos: true,
      }),
    ),
  );
  await Promise.all(streams.map((s) => s.firstToken));
  // More load queued behind them, submitted while the server goes away.
  const queued = Array.from({ length: 8 }, () => chatOnce(openai, { model: MODEL, max_tokens: 4 }));

  const offset = logOffset(stack);
  process.kill(pidOf(stack, "nats-server"), "SIGKILL");
  await waitForLog(stack, /nats-server exited \(killed by SIGKILL\); restarting in 1 s/, offset);

  const ended = await Promise.all(
    [...streams.map((s) => s.outcome), ...queued].map((p) =>
      Promise.race([
        p,
        new Promise<never>((_, reject) => setTimeout(() => reject(new Error("a request hung")), HANG_MS)),
      ]),
    ),
  );
  const inFlight = ended.slice(0, streams.length);
  const failedOrDone = (o: StreamOutcome) => (o.error ? "error" : o.finishReason === "length" ? "complete" : "cut");
  // Ended one way or the other, each stream in OpenAI's terms: never cut off without a reason.
  for (const o of inFlight) expect(["error", "complete"]).toContain(failedOrDone(o));
  for (const o of ended) if (o.error) expect(o.error.type).toMatch(/server_error|invalid_request_error/);

  // Back: poll its health endpoint, then requests must succeed within 5 s of that.
  let backAt = 0;
  for (const until = Date.now() + 60_000; !backAt; await new Promise((r) => setTimeout(r, 50))) {
    const ok = await fetch(`http://127.0.0.1:${stack.natsHttpPort}/healthz?js-enabled-only=true`).then(
      (r) => r.ok,
      () => false,
    );
    if (ok) backAt = Date.now();
    else if (Date.now() > until) throw new Error("nats-server did not come back");
  }
  let firstOkAt = 0;
  for (;;) {
    const res = await chatOnce(openai, { model: MODEL, max_tokens: 2 });
    if (!res.error) {
      firstOkAt = Date.now();
      break;
    }
    expect(Date.now() - backAt, `still failing: ${res.error.message}`).toBeLessThan(5000);
    await new Promise((r) => setTimeout(r, 100));
  }
  console.log(
    `nats restart: in flight ${inFlight.map(failedOrDone).join(",")}; ` +
      `first success ${firstOkAt - backAt} ms after the server was back`,
  );
  expect(firstOkAt - backAt).toBeLessThan(5000);
  // And it stays served: a burst all succeed.
  const burst = await Promise.all(Array.from({ length: 16 }, () => chatOnce(openai, { model: MODEL, max_tokens: 2 })));
  for (const r of burst) expect(r.error).toBeUndefined();
}, 180_000);
