/**
 * A worker that dies after pulling a request but before starting it: JetStream redelivers the request once the
 * consumer's ack_wait passes (3 s on this stack), the live worker claims it, the gateway grants the claim (no
 * worker started it), and the client gets its whole answer without an error.
 *
 * A real worker's window between pulling and starting is microseconds, too short to kill it in on purpose. The
 * dying worker is therefore a process that pulls from the pool's consumer as a worker does and is killed with the
 * request in hand: for JetStream and the gateway, the state it leaves behind (a delivered, unacknowledged request
 * whose connection is gone) is the same. The real workers are paused meanwhile, so that only the doomed one pulls.
 */
import { spawn } from "node:child_process";
import { poolNames } from "@llama-edge/shared";
import { jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { afterAll, beforeAll, expect, inject, it } from "vitest";
import { exited } from "../../scripts/supervisor.mjs";
import { natsUrl, pidOf, secrets } from "../helpers/local-stack.ts";
import { chatOnce, client } from "../helpers/openai-streams.ts";

const stack = inject("stack");
const names = poolNames("default");

/** Pulls one request from the pool's consumer, prints its id and delivery count, then waits to be killed. */
const DOOMED_WORKER = `
import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
const [url, stream, consumer] = process.argv.slice(-3);
const nc = await connect({ servers: url });
const c = await jetstream(nc).consumers.get(stream, consumer);
const msg = await c.next({ expires: 60000 });
const req = msg.json();
console.log(JSON.stringify({ id: req.id, deliveries: msg.info.deliveryCount }));
setInterval(() => {}, 1000);
`;

let nc: Awaited<ReturnType<typeof connect>>;
let workerPids: number[] = [];
const pause = (signal: "SIGSTOP" | "SIGCONT") => {
  for (const pid of workerPids) process.kill(pid, signal);
};

beforeAll(async () => {
  nc = await connect({ servers: natsUrl(stack) });
});

afterAll(async () => {
  pause("SIGCONT");
  await nc?.close();
});

/** Pull requests waiting at the pool's consumer, polled until `count`. */
async function waitForWaitingPulls(count: number): Promise<void> {
  const jsm = await jetstreamManager(nc);
  for (const until = Date.now() + 30_000; ; await new Promise((r) => setTimeout(r, 100))) {
    const info = await jsm.consumers.info(names.stream, names.consumer);
    if (info.num_waiting === count) return;
    if (Date.now() > until) throw new Error(`num_waiting stayed ${info.num_waiting}, expected ${count}`);
  }
}

it("serves a request whose first worker died before starting it, without an error", async () => {
  // The real workers stop pulling: paused, their outstanding pulls expire (2 s) and nothing else asks.
  workerPids = ["default-0", "default-1"].map((w) => pidOf(stack, `worker ${w}`));
  pause("SIGSTOP");
  await waitForWaitingPulls(0);

  const doomed = spawn(
    process.execPath,
    ["--input-type=module", "-e", DOOMED_WORKER, natsUrl(stack), names.stream, names.consumer],
    {
      stdio: ["ignore", "pipe", "inherit"],
    },
  );
  try {
    await waitForWaitingPulls(1);
    const pulled = new Promise<{ id: string; deliveries: number }>((resolve) =>
      doomed.stdout?.once("data", (d: Buffer) => resolve(JSON.parse(d.toString()))),
    );
    const answer = chatOnce(client(stack.url, secrets(stack).key), {
      model: "stories15m-random",
      max_tokens: 8,
      ignore_eos: true,
    } as Parameters<typeof chatOnce>[1]);
    const taken = await pulled;
    expect(taken.deliveries).toBe(1);
    doomed.kill("SIGKILL");
    await exited(doomed);

    pause("SIGCONT");
    const res = await answer;
    expect(res.error).toBeUndefined();
    expect(res.finishReason).toBe("length");
    expect(res.usage?.completion_tokens).toBe(8);
    // The doomed worker held this very request (queued as `-q` when first offered to a paused worker).
    expect([`${res.requestId}-0`, `${res.requestId}-0-q`]).toContain(taken.id);
  } finally {
    doomed.kill("SIGKILL");
    pause("SIGCONT");
  }
}, 120_000);
