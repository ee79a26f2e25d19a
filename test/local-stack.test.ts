/**
 * `npm start` itself (scripts/start.mjs as a child process): it supervises its processes as Kubernetes would, keeps
 * secrets off command lines, stops every child on a signal whatever state it is in, and sidesteps a nats-server
 * that already holds its port. The heavier repetitions (20 kills, NATS restarts, fuzzing) are in test/chaos/.
 */
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureNatsServer } from "../scripts/nats.mjs";
import { freePort } from "../scripts/ports.mjs";
import { exited } from "../scripts/supervisor.mjs";
import {
  isAlive,
  type LocalStack,
  logOffset,
  pidOf,
  readLog,
  secrets,
  spawnLocalStack,
  startLocalStack,
  waitForLog,
} from "./helpers/local-stack.ts";
import { chatOnce, client, watchStream } from "./helpers/openai-streams.ts";
import { sendRaw } from "./helpers/raw-http.ts";

const MODEL = "stories15m-random";
const LONG = { model: MODEL, messages: [{ role: "user" as const, content: "Tell me a story" }], max_tokens: 240 };

let stack: LocalStack;
/** A nats-server as Debian's nats-server.service runs it: no JetStream, no WebSocket, on the port we prefer. */
let systemNats: ReturnType<typeof spawn>;
let systemNatsPort: number;

beforeAll(async () => {
  systemNatsPort = await freePort();
  systemNats = spawn(ensureNatsServer(), ["-a", "127.0.0.1", "-p", String(systemNatsPort)], { stdio: "ignore" });
  stack = await startLocalStack({ args: ["--workers", "2"], env: { NATS_PORT: String(systemNatsPort) } });
}, 300_000);

afterAll(async () => {
  if (stack && stack.proc.exitCode === null && stack.proc.signalCode === null) await stack.stop("SIGKILL");
  systemNats?.kill("SIGKILL");
  if (systemNats) await exited(systemNats);
});

/** Pids of everything the supervisor started, as it printed them. */
function childPids(s: LocalStack): number[] {
  return [...readLog(s).matchAll(/\] [\w -]+: pid (\d+)/g)].map((m) => Number(m[1]));
}

describe("npm start", () => {
  it("runs its own nats-server on free ports when the preferred one is taken, and says so", async () => {
    expect(readLog(stack)).toMatch(new RegExp(`port\\(s\\) ${systemNatsPort} already in use.*running our own`));
    const ours = Number(/nats-server: pid \d+, nats:\/\/127\.0\.0\.1:(\d+)/.exec(readLog(stack))?.[1]);
    expect(ours).not.toBe(systemNatsPort);
    const res = await chatOnce(client(stack.url, secrets(stack).key), { model: MODEL, max_tokens: 3 });
    expect(res.error).toBeUndefined();
    expect(res.usage?.completion_tokens).toBe(3);
  });

  it("keeps secrets off every command line", () => {
    const { adminSecret } = secrets(stack);
    for (const pid of [stack.pid, ...childPids(stack)]) {
      if (!isAlive(pid)) continue;
      expect(readFileSync(`/proc/${pid}/cmdline`, "utf8")).not.toContain(adminSecret);
    }
  });

  it("restarts a worker killed mid-stream: its streams end with worker_lost within 3 s, the rest keeps going", async () => {
    const openai = client(stack.url, secrets(stack).key);
    const before = { nats: pidOf(stack, "nats-server"), gateway: pidOf(stack, "gateway") };
    const streams = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        watchStream(openai, { ...LONG, messages: [{ role: "user", content: `Story ${i}` }], ignore_eos: true }),
      ),
    );
    await Promise.all(streams.map((s) => s.firstToken));
    // The victim: whichever worker serves the first stream (prefix affinity and the queue decide which).
    const victim = streams[0]!.worker!;
    const other = victim === "default-0" ? "default-1" : "default-0";
    const survivor = pidOf(stack, `worker ${other}`);
    const offset = logOffset(stack);
    const victimPid = pidOf(stack, `worker ${victim}`);
    const killedAt = Date.now();
    process.kill(victimPid, "SIGKILL");

    const outcomes = await Promise.all(streams.map((s) => s.outcome));
    for (const [i, o] of outcomes.entries()) {
      if (streams[i]!.worker === victim) {
        expect(o.error).toMatchObject({ code: "worker_lost", type: "server_error" });
        expect(o.endedAt - killedAt).toBeLessThan(3000);
      } else {
        expect(o.error).toBeUndefined();
        expect(o.finishReason).toBe("length");
      }
    }
    // The other worker serves meanwhile; the replacement starts after the back-off; nothing else was restarted.
    const meanwhile = await chatOnce(openai, { model: MODEL, max_tokens: 2 });
    expect(meanwhile.error).toBeUndefined();
    await waitForLog(stack, new RegExp(`worker ${victim} exited \\(killed by SIGKILL\\); restarting in 1 s`), offset);
    await waitForLog(stack, new RegExp(`worker ${victim}: ready`), offset, 120_000);
    expect(pidOf(stack, `worker ${victim}`)).not.toBe(victimPid);
    expect([pidOf(stack, "nats-server"), pidOf(stack, "gateway"), pidOf(stack, `worker ${other}`)]).toEqual([
      before.nats,
      before.gateway,
      survivor,
    ]);
    // The replacement serves: with the other worker paused it is the only one that can.
    process.kill(survivor, "SIGSTOP");
    try {
      const res = await chatOnce(openai, { model: MODEL, max_tokens: 2 });
      expect(res.error).toBeUndefined();
      expect(res.worker).toBe(victim);
    } finally {
      process.kill(survivor, "SIGCONT");
    }
  }, 180_000);

  it("answers the request after a 413 for an oversized upload, chunked or not", async () => {
    const { key } = secrets(stack);
    const big = Buffer.alloc(2 * 1024 * 1024, "a");
    for (const chunked of [true, false]) {
      const res = await sendRaw(`${stack.url}/v1/chat/completions`, {
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        body: big,
        chunks: chunked ? 32 : 0,
      });
      expect(res.status).toBe(413);
      expect(JSON.parse(res.text)).toMatchObject({ error: { code: "request_too_large" } });
      // The next request, on a new connection as from another client, is served normally.
      const next = await chatOnce(client(stack.url, key), { model: MODEL, max_tokens: 2 });
      expect(next.error).toBeUndefined();
    }
  });

  it("stops every child on SIGTERM, also a worker waiting out its restart back-off", async () => {
    const children = childPids(stack);
    const offset = logOffset(stack);
    process.kill(pidOf(stack, "worker default-1"), "SIGKILL");
    await waitForLog(stack, /worker default-1 exited \(killed by SIGKILL\); restarting/, offset);
    expect(await stack.stop("SIGTERM")).toBe(0);
    for (const pid of children) expect(isAlive(pid), `pid ${pid}`).toBe(false);
  }, 120_000);
});

describe("Ctrl-C while starting", () => {
  it("stops what was started so far: nats-server, a gateway being bundled, a worker loading its model", async () => {
    const starting = await spawnLocalStack();
    try {
      await waitForLog(starting, /worker default-0: pid \d+/, 0, 120_000);
      const children = childPids(starting);
      expect(children.length).toBeGreaterThanOrEqual(3);
      expect(await starting.stop("SIGINT")).toBe(0);
      for (const pid of children) expect(isAlive(pid), `pid ${pid}`).toBe(false);
    } finally {
      if (starting.proc.exitCode === null && starting.proc.signalCode === null) starting.proc.kill("SIGKILL");
    }
  }, 180_000);
});
