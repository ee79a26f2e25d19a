/**
 * Every metric the Grafana dashboard and the PrometheusRule (infra/k8s/monitoring) query exists where it comes from:
 *   llama_worker_*      in a live worker's /metrics (real nats-server, real `llama-worker serve`, one request served)
 *   llama_gateway_*     in a live gateway's /metrics (workerd, as `npm start` runs it; the request came through it)
 *   jetstream_consumer_* from the NATS exporter, which names them after the fields of nats-server's /jsz: each
 *                       field must be in the live server's /jsz for the pool's consumer
 *   llama:*             recorded by the PrometheusRule itself
 * A name from anywhere else fails the test: a typo or a renamed metric would otherwise leave a panel empty or an
 * alert silent.
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { poolNames } from "@llama-edge/shared";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { admin, type Gateway, startGateway } from "../edge/dev/gateway.mjs";
import { ensureDefaultModel } from "../gpu-worker/src/model/default-model.ts";
import { k8sDir, loadManifests } from "../infra/test/k8s.ts";
import { startTestNats, type TestNats } from "./helpers/nats-server.ts";
import { startWorkerProcess, type WorkerProcess } from "./helpers/worker-process.ts";

const MONITORING = join(k8sDir, "monitoring");
const POOL = "metrics";

/** PromQL words that are not metric names. */
const PROMQL_WORDS = new Set([
  "by",
  "without",
  "on",
  "ignoring",
  "group_left",
  "group_right",
  "and",
  "or",
  "unless",
  "bool",
  "offset",
  "inf",
  "nan",
]);

/** Metric names in a PromQL expression: identifiers that are not functions, keywords, labels or strings. */
export function metricNames(expr: string): string[] {
  const stripped = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""') // strings (label values, regexes, label_replace arguments)
    .replace(/\{[^}]*\}/g, "") // label matchers
    .replace(/\[[^\]]*\]/g, "") // ranges and subqueries
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ""); // label lists
  const names = new Set<string>();
  // Not right after a digit or a dot: the unit of a duration (offset 5m) or of a number (1e3).
  for (const m of stripped.matchAll(/(?<![\w:.])[A-Za-z_:][\w:]*(?=\s*(\(?))/g)) {
    if (m[1] === "(") continue; // a function or aggregation
    if (PROMQL_WORDS.has(m[0].toLowerCase())) continue;
    names.add(m[0]);
  }
  return [...names];
}

interface Queries {
  /** expr → where it is used. */
  exprs: Map<string, string>;
  recorded: Set<string>;
}

function monitoringQueries(): Queries {
  const exprs = new Map<string, string>();
  const recorded = new Set<string>();
  const dashboard = JSON.parse(readFileSync(join(MONITORING, "grafana-dashboard.json"), "utf8"));
  for (const p of dashboard.panels as { title: string; targets?: { expr: string }[] }[]) {
    for (const t of p.targets ?? []) exprs.set(t.expr, `dashboard panel "${p.title}"`);
  }
  for (const v of dashboard.templating.list as { name: string; definition?: string }[]) {
    const q = /label_values\(([^,)]+)/.exec(v.definition ?? "")?.[1];
    if (q) exprs.set(q, `dashboard variable ${v.name}`);
  }
  const [rule] = loadManifests(join(MONITORING, "prometheusrule.yaml"));
  const groups = (rule?.spec?.groups ?? []) as { rules: { record?: string; alert?: string; expr: string }[] }[];
  for (const g of groups) {
    for (const r of g.rules) {
      exprs.set(r.expr, r.record ? `recording rule ${r.record}` : `alert ${r.alert}`);
      if (r.record) recorded.add(r.record);
    }
  }
  return { exprs, recorded };
}

describe("metricNames", () => {
  it("finds the metrics of a query and nothing else", () => {
    expect(
      metricNames(
        'histogram_quantile(0.95, sum by (le, pool) (rate(a_seconds_bucket{pool=~"$pool"}[5m]))) / on (pool) b:rec > 0 unless c_total offset 5m',
      ).sort(),
    ).toEqual(["a_seconds_bucket", "b:rec", "c_total"]);
    expect(metricNames('label_replace(sum by (x) (m1{y="z"}), "pool", "$1", "x", "llama-(.+)")')).toEqual(["m1"]);
  });
});

describe("what the dashboard and the alerts query exists", () => {
  let nats: TestNats;
  let worker: WorkerProcess;
  let gw: Gateway;
  let stateDir: string;
  let exposition = "";
  let gatewayExposition = "";
  let jsz: Record<string, unknown> = {};

  beforeAll(async () => {
    await ensureDefaultModel("default", { quiet: true });
    nats = await startTestNats();
    stateDir = mkdtempSync(join(tmpdir(), "llama-edge-gw-"));
    [worker, gw] = await Promise.all([
      startWorkerProcess({ natsUrl: nats.url, pool: POOL, workerId: "metrics-w" }),
      startGateway({
        natsWsUrl: nats.wsUrl,
        persistTo: stateDir,
        config: { pools: { [POOL]: { max_context: 256, models: ["stories15m-random"] } } },
      }),
    ]);
    // One request through the gateway, so that labelled series (requests by outcome, tokens by key) have a
    // sample, and one its key's RPM limit refuses.
    const { key } = (await admin(gw, "POST", "/keys", { name: "metrics", limits: { rpm: 1 } })) as { key: string };
    const complete = () =>
      fetch(`${gw.url}/v1/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        body: JSON.stringify({
          model: "stories15m-random",
          prompt: "Once upon a time",
          max_tokens: 4,
          ignore_eos: true,
        }),
      });
    expect((await complete()).status).toBe(200);
    expect((await complete()).status).toBe(429);
    // The request settles with its key as the job ends, which may be just after the answer: scrape until it has.
    const settledTokens = /^llama_gateway_tokens_total\{[^}]*kind="completion"\} 4$/m;
    for (let i = 0; i < 100 && !settledTokens.test(gatewayExposition); i++) {
      if (i > 0) await new Promise((r) => setTimeout(r, 100));
      const scraped = await fetch(`${gw.url}/metrics`, { headers: { authorization: `Bearer ${gw.adminSecret}` } });
      expect(scraped.status).toBe(200);
      gatewayExposition = await scraped.text();
    }
    const port = (worker.logs.find((l) => l.msg === "health server listening") as { port?: number })?.port;
    exposition = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    const jszAll = (await (await fetch(`http://127.0.0.1:${nats.httpPort}/jsz?consumers=true&config=true`)).json()) as {
      account_details?: { stream_detail?: { consumer_detail?: Record<string, unknown>[] }[] }[];
    };
    const consumers = (jszAll.account_details ?? []).flatMap((a) =>
      (a.stream_detail ?? []).flatMap((s) => s.consumer_detail ?? []),
    );
    jsz = consumers.find((c) => c.name === poolNames(POOL).consumer) ?? {};
  }, 180_000);

  afterAll(async () => {
    await gw?.stop();
    worker?.kill("SIGTERM");
    await worker?.exited;
    await nats?.stop();
    if (stateDir) rmSync(stateDir, { recursive: true, force: true });
  });

  it("every metric comes from a live worker or gateway, the NATS exporter's /jsz fields, or a recording rule", () => {
    const { exprs, recorded } = monitoringQueries();
    expect(exprs.size).toBeGreaterThan(20);
    // A histogram's series are <name>_bucket, _sum and _count; the exposition declares <name>.
    const workerMetrics = new Set([...exposition.matchAll(/^# TYPE (\S+) (\S+)/gm)].map((m) => m[1]));
    const gatewayMetrics = new Set([...gatewayExposition.matchAll(/^# TYPE (\S+) (\S+)/gm)].map((m) => m[1]));
    const fromWorker = (name: string) =>
      workerMetrics.has(name) || workerMetrics.has(name.replace(/_(bucket|sum|count)$/, ""));
    expect(Object.keys(jsz), "the pool's consumer in nats-server's /jsz").toContain("num_pending");
    const problems: string[] = [];
    const used = new Set<string>();
    for (const [expr, where] of exprs) {
      for (const name of metricNames(expr)) {
        used.add(name);
        if (name.startsWith("llama_worker_")) {
          if (!fromWorker(name)) problems.push(`${where}: ${name} is not in the worker's /metrics`);
        } else if (name.startsWith("llama_gateway_")) {
          if (!gatewayMetrics.has(name)) problems.push(`${where}: ${name} is not in the gateway's /metrics`);
        } else if (name.startsWith("jetstream_consumer_")) {
          const field = name.slice("jetstream_consumer_".length);
          if (!(field in jsz)) problems.push(`${where}: ${name}: no field ${field} in /jsz consumers`);
        } else if (name.includes(":")) {
          if (!recorded.has(name)) problems.push(`${where}: ${name} is recorded by no rule`);
        } else problems.push(`${where}: ${name} comes from nothing this project deploys`);
      }
    }
    expect(problems).toEqual([]);
    // The operator's essentials are all there (the list, in vLLM's terms).
    for (const name of [
      "llama_worker_time_to_first_token_seconds_bucket",
      "llama_worker_inter_token_latency_seconds_bucket",
      "llama_worker_num_requests_running",
      "llama_worker_num_requests_waiting",
      "llama_worker_kv_cache_usage_ratio",
      "llama_worker_cached_prompt_tokens_total",
      "llama_worker_preemptions_total",
      "llama_worker_cold_start_seconds",
      "llama_worker_generation_tokens_total",
      "jetstream_consumer_num_pending",
      "jetstream_consumer_num_ack_pending",
      "llama_gateway_requests_total",
      "llama_gateway_rate_limited_total",
      "llama_gateway_tokens_total",
    ]) {
      expect(used, name).toContain(name);
    }
  });

  it("the worker's and the gateway's metrics follow Prometheus conventions: _total only on counters, base units", () => {
    const types = new Map([...exposition.matchAll(/^# TYPE (llama_worker_\S+) (\S+)/gm)].map((m) => [m[1], m[2]]));
    expect(types.size).toBeGreaterThan(15);
    const gatewayTypes = [...gatewayExposition.matchAll(/^# TYPE (llama_gateway_\S+) (\S+)/gm)];
    expect(gatewayTypes.length).toBeGreaterThanOrEqual(4);
    for (const [, name, type] of gatewayTypes) types.set(name!, type!);
    for (const [name, type] of types) {
      expect(name.endsWith("_total"), `${name} (${type})`).toBe(type === "counter");
      expect(name, "seconds, not milliseconds").not.toMatch(/_ms$|_milliseconds/);
    }
    // The gateway counted the 429 under the limit that refused it, and the completion's tokens under its key.
    expect(gatewayExposition).toMatch(/^llama_gateway_rate_limited_total\{key="key_\w+",limit="rpm"\} 1$/m);
    expect(gatewayExposition).toMatch(
      /^llama_gateway_tokens_total\{key="key_\w+",model="stories15m-random",kind="completion"\} 4$/m,
    );
    // The cold start was recorded by phase.
    for (const phase of ["init", "download", "compile", "load", "connect"]) {
      expect(exposition).toMatch(
        new RegExp(`llama_worker_cold_start_seconds\\{[^}]*phase="${phase}"[^}]*\\} [0-9.e-]+`),
      );
    }
  });
});
