/**
 * The time to first token the edge path adds, on loopback: the same requests, alternately
 *   (a) through the gateway: HTTP + SSE under workerd (`wrangler dev`), key Durable Object admission, dispatch
 *       shard Durable Object, NATS over WebSocket, and
 *   (b) straight to the worker pool with the shared Dispatcher over NATS/TCP from Node (the engine behind its
 *       worker service, no gateway),
 * against one `llama-worker serve` with the default model. Prints p50/p90 of both and the difference.
 * `--runtime miniflare` (default) serves the bundled gateway on workerd as production does; `--runtime wrangler`
 * measures `wrangler dev`, whose development proxy adds one more HTTP hop (~0.8 ms per request).
 *
 *   npx tsx edge/bench/ttft.ts [--n 200] [--runtime miniflare|wrangler] [--model <dir>]
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { Dispatcher } from "@llama-edge/shared";
import { connect } from "@nats-io/transport-node";
import { startTestNats } from "../../test/helpers/nats-server.ts";
import { startWorkerProcess } from "../../test/helpers/worker-process.ts";
import { admin, startGateway } from "../dev/gateway.mjs";

const { values } = parseArgs({
  options: { n: { type: "string" }, model: { type: "string" }, runtime: { type: "string" } },
});
const runtime = values.runtime === "wrangler" ? "wrangler" : "miniflare";
const N = Number(values.n ?? 200);
const MODEL = values.model ? (values.model.replace(/\/+$/, "").split("/").pop() ?? "") : "stories15m-random";
const PROMPT_IDS = [1, 9038, 2501, 263, 931, 29892, 727, 471, 263, 2217];

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
};
const fmt = (xs: number[]) => `p50 ${pct(xs, 50).toFixed(2)} ms  p90 ${pct(xs, 90).toFixed(2)} ms  (n=${xs.length})`;

const nats = await startTestNats();
const stateDir = mkdtempSync(join(tmpdir(), "llama-edge-bench-"));
const worker = await startWorkerProcess({
  natsUrl: nats.url,
  pool: "default",
  workerId: "bench-w1",
  args: values.model ? ["--model", values.model] : [],
});
const gw = await startGateway({
  natsWsUrl: nats.wsUrl,
  persistTo: stateDir,
  config: { pools: { default: { max_context: 256, models: [MODEL] } } },
  logLevel: "error",
  runtime,
});
const nc = await connect({ servers: nats.url });
const dispatcher = new Dispatcher(nc);
try {
  const { key } = (await admin(gw, "POST", "/keys", { name: "bench" })) as { key: string };

  async function viaGateway(): Promise<number> {
    const t0 = performance.now();
    const res = await fetch(`${gw.url}/v1/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
      body: JSON.stringify({ model: MODEL, prompt: PROMPT_IDS, max_tokens: 1, stream: true }),
    });
    const reader = res.body!.getReader();
    const { value } = await reader.read(); // the first chunk carries the first token
    const t = performance.now() - t0;
    if (!value || !new TextDecoder().decode(value).startsWith("data: {")) throw new Error("unexpected first chunk");
    while (!(await reader.read()).done) {}
    return t;
  }

  let seq = 0;
  async function direct(): Promise<number> {
    const t0 = performance.now();
    let t = Number.NaN;
    const prompt = { type: "tokens" as const, token_ids: PROMPT_IDS };
    for await (const ev of dispatcher.submit("default", {
      id: `bench-${seq++}`,
      model: MODEL,
      prompt,
      sampling: { max_tokens: 1 },
    })) {
      if (ev.type === "delta" && Number.isNaN(t)) t = performance.now() - t0;
    }
    return t;
  }

  for (let i = 0; i < 20; i++) {
    await viaGateway();
    await direct();
  }
  async function health(): Promise<number> {
    const t0 = performance.now();
    await (await fetch(`${gw.url}/health`)).text();
    return performance.now() - t0;
  }

  const gwTimes: number[] = [];
  const directTimes: number[] = [];
  const healthTimes: number[] = [];
  for (let i = 0; i < N; i++) {
    gwTimes.push(await viaGateway());
    directTimes.push(await direct());
    healthTimes.push(await health());
  }
  console.log(`gateway on ${runtime}, ${MODEL}, prompt of ${PROMPT_IDS.length} tokens, max_tokens 1, sequential`);
  console.log(`through the gateway : ${fmt(gwTimes)}`);
  console.log(`dispatcher direct   : ${fmt(directTimes)}`);
  console.log(`edge path adds      : p50 ${(pct(gwTimes, 50) - pct(directTimes, 50)).toFixed(2)} ms`);
  console.log(`  of which one HTTP round trip to the gateway (GET /health): ${fmt(healthTimes)}`);
} finally {
  await nc.close();
  await gw.stop();
  worker.kill("SIGTERM");
  await worker.exited;
  await nats.stop();
  rmSync(stateDir, { recursive: true, force: true });
}
