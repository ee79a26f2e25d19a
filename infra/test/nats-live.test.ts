/**
 * The NATS accounts and permissions of infra/k8s/nats/values.yaml, loaded into a real nats-server, with the real
 * client code of each side: the pool-setup configs as the Job creates them (pool-admin), the workers' ensurePool
 * and the same JetStream calls NatsWorker makes (worker), and the gateway's Dispatcher (edge). Also reads the lag
 * the way KEDA's nats-jetstream scaler does, with the ScaledObject's own stream, consumer and account.
 */

import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  Dispatcher,
  encodeMessage,
  type LoadReport,
  PROTOCOL_VERSION,
  parseClaimReply,
  parseRequestMessage,
  poolNames,
  type TokenEvent,
} from "@llama-edge/shared";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection, Status } from "@nats-io/nats-core";
import { connect } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensurePool } from "../../gpu-worker/src/service/pool-setup.ts";
import { ensureNatsServer, waitForNats } from "../../scripts/nats.mjs";
import { k8sDir, loadManifests } from "./k8s.ts";
import { natsValues, renderMergeConfig, variablesUsed } from "./nats-values.ts";

const POOL = "default";
const names = poolNames(POOL);
const workerDir = join(k8sDir, "worker");
const trigger = loadManifests(join(workerDir, "scaledobject.yaml"))[0].spec.triggers[0].metadata as Record<
  string,
  string
>;

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const { port } = srv.address() as { port: number };
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

/** A connection as one of the users, recording the server's errors (permission violations) on it. */
interface Conn {
  nc: NatsConnection;
  errors: Error[];
}

let dir: string;
let server: ChildProcess;
let url: string;
let httpPort: number;
const passwords: Record<string, string> = {};
const conns: Conn[] = [];

async function login(user: string): Promise<Conn> {
  const envVar = natsValues()
    .config.merge.accounts.LLAMA.users.find((u) => u.user === user)
    ?.password.replace(/^<< \$(.*) >>$/, "$1");
  const nc = await connect({ servers: url, user, pass: passwords[envVar ?? ""], name: `infra-test ${user}` });
  const conn: Conn = { nc, errors: [] };
  void (async () => {
    for await (const s of nc.status() as AsyncIterable<Status>) if (s.type === "error") conn.errors.push(s.error);
  })();
  conns.push(conn);
  return conn;
}

/** The lag KEDA's nats-jetstream scaler computes: GET /jsz?acc=&consumers=true&config=true, then
 *  NumPending + NumAckPending of the named consumer of the named stream in the named account. */
async function kedaLag(): Promise<number> {
  const r = await fetch(`http://127.0.0.1:${httpPort}/jsz?acc=${trigger.account}&consumers=true&config=true`);
  const jsz = (await r.json()) as {
    account_details?: {
      name: string;
      stream_detail?: {
        name: string;
        consumer_detail?: { name: string; num_pending: number; num_ack_pending: number }[];
      }[];
    }[];
  };
  const account = jsz.account_details?.find((a) => a.name === trigger.account);
  const stream = account?.stream_detail?.find((s) => s.name === trigger.stream);
  const consumer = stream?.consumer_detail?.find((c) => c.name === trigger.consumer);
  if (!consumer)
    throw new Error(`KEDA would not find ${trigger.account}/${trigger.stream}/${trigger.consumer} in /jsz`);
  return consumer.num_pending + consumer.num_ack_pending;
}

async function until(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const permissionErrors = (c: Conn) =>
  c.errors.filter((e) => e.name === "PermissionViolationError").map((e) => e.message);

beforeAll(async () => {
  const bin = ensureNatsServer();
  dir = mkdtempSync(join(tmpdir(), "llama-edge-infra-nats-"));
  const port = await freePort();
  httpPort = await freePort();
  url = `nats://127.0.0.1:${port}`;
  const values = natsValues();
  for (const v of variablesUsed(values.config)) passwords[v] = `p${v.toLowerCase().replace(/[^a-z0-9]/g, "")}0secret`;
  // The chart renders the whole config as one JSON object; here: our listeners plus the values' `config.merge`.
  const merge = renderMergeConfig(values).trim().replace(/^\{/, "").replace(/\}$/, "");
  const conf = `{
  "server_name": "infra-test",
  "listen": "127.0.0.1:${port}",
  "http": "127.0.0.1:${httpPort}",
  "jetstream": { "store_dir": ${JSON.stringify(join(dir, "js"))}, "max_memory_store": 67108864, "max_file_store": 268435456 },
${merge}
}
`;
  writeFileSync(join(dir, "nats.conf"), conf);
  server = spawn(bin, ["-c", join(dir, "nats.conf")], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, ...passwords },
  });
  let stderr = "";
  server.stderr?.on("data", (d) => {
    stderr += d;
  });
  try {
    await waitForNats(httpPort, 15_000, server);
  } catch (e) {
    throw new Error(`${(e as Error).message}\n${stderr}\n${conf}`);
  }
}, 60_000);

afterAll(async () => {
  for (const c of conns) await c.nc.close().catch(() => {});
  if (server && server.exitCode === null) {
    const exited = new Promise((r) => server.once("exit", r));
    server.kill("SIGTERM");
    await exited;
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("NATS permissions on a live server", () => {
  let admin: Conn;
  let worker: Conn;
  let edge: Conn;

  it("pool-admin creates the pool's stream and consumer from the pool-setup configs (what the Job runs)", async () => {
    admin = await login("pool-admin");
    const jsm = await jetstreamManager(admin.nc);
    const stream = JSON.parse(readFileSync(join(workerDir, "stream.json"), "utf8"));
    const consumer = JSON.parse(readFileSync(join(workerDir, "consumer.json"), "utf8"));
    await jsm.streams.add({ ...stream, num_replicas: 1 }); // one server here; the cluster gets 3
    await jsm.consumers.add(names.stream, consumer);
    expect(await kedaLag()).toBe(0);
    expect(permissionErrors(admin)).toEqual([]);
  });

  it("a worker finds them (ensurePool) and creates nothing", async () => {
    worker = await login("worker");
    const setup = await ensurePool(await jetstreamManager(worker.nc), POOL);
    expect(setup.created).toEqual({ stream: false, consumer: false });
    expect(setup.ackWaitMs).toBe(30_000);
  });

  it("a request flows edge -> queue -> worker -> edge; the lag KEDA reads counts it queued and running", async () => {
    edge = await login("edge");
    const loads: LoadReport[] = [];
    edge.nc.subscribe(names.load, {
      callback: (_e, m) => {
        loads.push(m.json<LoadReport>());
      },
    });
    const cancels: string[] = [];
    worker.nc.subscribe(names.cancel, {
      callback: (_e, m) => {
        cancels.push(m.string());
      },
    });
    await edge.nc.flush();
    await worker.nc.flush();

    const load: LoadReport = {
      v: PROTOCOL_VERSION,
      worker_id: "w1",
      pool: POOL,
      model: "m",
      ts: Date.now(),
      running: 0,
      waiting: 0,
      max_num_seqs: 32,
      kv_blocks_total: 10,
      kv_blocks_free: 10,
      kv_usage: 0,
      prefix_cache: { block_size: 16, hit_rate: 0, block_hashes: [] },
      tokens_per_second: 0,
      draining: false,
    };
    worker.nc.publish(names.load, encodeMessage(load));
    await until("the load report at the edge", () => loads.length === 1);

    const dispatcher = new Dispatcher(edge.nc);
    const stream = dispatcher.submit(POOL, { id: "req-1", model: "m", prompt: { type: "text", text: "hi" } });
    const first = stream.next(); // submits
    await until("lag 1 (queued)", async () => (await kedaLag()) === 1);

    const consumer = await jetstream(worker.nc).consumers.get(names.stream, names.consumer);
    const msg = await consumer.next({ expires: 2000 });
    if (!msg) throw new Error("no request pulled");
    const parsed = parseRequestMessage(msg.data);
    if (!parsed.ok) throw new Error(parsed.message);
    const req = parsed.value;
    msg.working();
    expect(await kedaLag(), "running (ack pending) still counts").toBe(1);

    const events: TokenEvent[] = [
      { v: 1, id: req.id, seq: 0, type: "start", worker_id: "w1", queue_ms: 1 },
      { v: 1, id: req.id, seq: 1, type: "delta", text: "hello", token_ids: [1] },
      {
        v: 1,
        id: req.id,
        seq: 2,
        type: "final",
        finish_reason: "stop",
        usage: { prompt_tokens: 1, completion_tokens: 1, cached_tokens: 0 },
      },
    ];
    for (const ev of events) worker.nc.publish(req.reply_to, encodeMessage(ev));
    await msg.ackAck();
    const got = [(await first).value, (await stream.next()).value, (await stream.next()).value];
    expect(got.map((e) => e?.type)).toEqual(["start", "delta", "final"]);
    expect((await stream.next()).done).toBe(true);
    expect(await kedaLag()).toBe(0);
  });

  it("a redelivered request is claimed through the edge (request to reply_to, answered by the edge)", async () => {
    const dispatcher = new Dispatcher(edge.nc);
    const stream = dispatcher.submit(POOL, { id: "req-2", model: "m", prompt: { type: "text", text: "hi" } });
    const first = stream.next();
    const consumer = await jetstream(worker.nc).consumers.get(names.stream, names.consumer);
    const m1 = await consumer.next({ expires: 2000 });
    m1?.nak(); // as if the first worker gave it back before admission
    const m2 = await consumer.next({ expires: 2000 });
    if (!m2) throw new Error("not redelivered");
    expect(m2.info.deliveryCount).toBe(2);
    const req = parseRequestMessage(m2.data);
    if (!req.ok) throw new Error(req.message);
    const reply = await worker.nc.request(
      req.value.reply_to,
      encodeMessage({ v: 1, type: "claim", id: "req-2", worker_id: "w2" }),
      {
        timeout: 2000,
      },
    );
    const claim = parseClaimReply(reply.data);
    expect(claim.ok && claim.value.granted).toBe(true);
    worker.nc.publish(
      req.value.reply_to,
      encodeMessage({ v: 1, id: "req-2", seq: 0, type: "start", worker_id: "w2", queue_ms: 1 }),
    );
    worker.nc.publish(
      req.value.reply_to,
      encodeMessage({
        v: 1,
        id: "req-2",
        seq: 1,
        type: "final",
        finish_reason: "stop",
        usage: { prompt_tokens: 1, completion_tokens: 0, cached_tokens: 0 },
      }),
    );
    await m2.ackAck();
    expect((await first).value?.type).toBe("start");
    expect((await stream.next()).value?.type).toBe("final");
  });

  it("a cancel reaches the workers and takes a queued request off the queue", async () => {
    const dispatcher = new Dispatcher(edge.nc);
    const abort = new AbortController();
    const stream = dispatcher.submit(
      POOL,
      { id: "req-3", model: "m", prompt: { type: "text", text: "hi" } },
      { signal: abort.signal },
    );
    const first = stream.next().catch((e: Error) => e);
    await until("lag 1 (queued)", async () => (await kedaLag()) === 1);
    const cancels: string[] = [];
    worker.nc.subscribe(names.cancel, {
      callback: (_e, m) => {
        cancels.push(m.string());
      },
    });
    await worker.nc.flush();
    abort.abort();
    expect(((await first) as Error).name).toBe("CancelledError");
    await until("the cancel at the worker", () => cancels.length === 1);
    await until("lag 0 (deleted from the queue)", async () => (await kedaLag()) === 0);
  });

  it("nobody above hit a permission it lacks", async () => {
    for (const c of [admin, worker, edge]) await c.nc.flush();
    for (const c of [admin, worker, edge]) expect(permissionErrors(c)).toEqual([]);
  });

  it("the edge cannot pull requests or touch streams; a worker cannot submit, cancel or read the queue's subject", async () => {
    const edge2 = await login("edge");
    const worker2 = await login("worker");
    // Edge: pulling (what only workers do) and deleting a stream are refused.
    const consumer = await jetstream(edge2.nc).consumers.get(names.stream, names.consumer);
    await consumer.next({ expires: 1000 }).catch(() => null);
    await expect(
      (await jetstreamManager(edge2.nc, { checkAPI: false })).streams.delete(names.stream),
    ).rejects.toThrow();
    // Worker: submitting, cancelling and subscribing to the request subject are refused.
    await expect(
      jetstream(worker2.nc).publish(names.requests, encodeMessage({ v: 1, id: "x" }), { timeout: 1000 }),
    ).rejects.toThrow();
    worker2.nc.publish(names.cancel, encodeMessage({ v: 1, id: "x" }));
    worker2.nc.subscribe(names.requests);
    await until(
      "the server's refusals",
      () => permissionErrors(edge2).length >= 2 && permissionErrors(worker2).length >= 3,
    );
    expect(permissionErrors(edge2).join("\n")).toContain(`$JS.API.CONSUMER.MSG.NEXT.${names.stream}.${names.consumer}`);
    expect(permissionErrors(edge2).join("\n")).toContain(`$JS.API.STREAM.DELETE.${names.stream}`);
    const w = permissionErrors(worker2).join("\n");
    expect(w).toContain(names.requests);
    expect(w).toContain(names.cancel);
    expect(await kedaLag()).toBe(0);
  });
});
