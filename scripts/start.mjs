#!/usr/bin/env node
// `npm start`: the whole stack on one machine. nats-server (JetStream + a loopback WebSocket listener for the
// edge), GPU/CPU workers on the default model (or --model), and the gateway under workerd (`wrangler dev`).
// Prints the base URL, a development API key and a curl to paste; Ctrl-C stops everything (workers drain).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { ensureNpmDeps, root } from "./ensure-deps.mjs";

const USAGE = `Usage: npm start [-- options]

  --model <m>        The model to serve: a checkpoint directory, a compiled directory, or a Hugging Face
                     repo id org/name[@revision], downloaded once into the Hub cache (HF_ENDPOINT, HF_TOKEN,
                     HF_HOME). Default: the generated default model (random weights: meaningless output)
  --workers <n>      Worker processes for the pool (default 1)
  --autoscale        Let the local autoscaler size the pool from queue lag instead (KEDA's policy from
                     infra/k8s/worker/scaledobject.yaml; --min-workers/--max-workers override it)
  --min-workers <n>  --max-workers <n>
  --max-num-seqs <n> Sequences per worker (default 16)
  --port <port>      Gateway port (default 8787)
`;

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      model: { type: "string" },
      workers: { type: "string", default: "1" },
      autoscale: { type: "boolean" },
      "min-workers": { type: "string" },
      "max-workers": { type: "string" },
      "max-num-seqs": { type: "string", default: "16" },
      port: { type: "string", default: "8787" },
      help: { type: "boolean", short: "h" },
    },
  }));
} catch (e) {
  console.error(`${e.message}\n\n${USAGE}`);
  process.exit(2);
}
if (args.help) {
  console.log(USAGE);
  process.exit(0);
}

ensureNpmDeps();
// TypeScript modules (model generation, the autoscaler) run through tsx, as the worker CLI does.
const { register } = await import("tsx/esm/api");
register();
const { startNats } = await import("./nats.mjs");
const { startGateway, ensureDevKey, persistentSecret } = await import("../edge/dev/gateway.mjs");
const { connect } = await import("@nats-io/transport-node");

const POOL = "default";
const log = (msg) => console.log(`[llama-edge] ${msg}`);
const cleanups = [];
let stopping = false;
async function shutdown(code = 0) {
  if (stopping) return;
  stopping = true;
  log("stopping (workers finish their streams first)…");
  for (const fn of cleanups.reverse()) {
    try {
      await fn();
    } catch {
      // keep stopping the rest
    }
  }
  process.exit(code);
}
process.on("SIGINT", () => shutdown(0));
process.on("SIGTERM", () => shutdown(0));

try {
  // 1. the model, resolved (and downloaded) once here, as `llama-worker` resolves it; the workers get its directory
  const { resolveModel } = await import("../gpu-worker/src/model/model-source.ts");
  const source = await resolveModel(args.model, { tty: process.stderr.isTTY === true, log: (line) => log(line) });
  const modelDir = source.dir;
  const config = JSON.parse(readFileSync(join(modelDir, "config.json"), "utf8"));
  const modelName = source.name;
  const maxContext = config.max_position_embeddings ?? 2048;

  // 2. NATS
  const nats = await startNats({ stdio: "ignore", detached: true });
  cleanups.push(() => nats.stop());
  log(`nats-server on ${nats.url} (WebSocket ${nats.wsUrl})`);

  // 3. workers: a fixed number, or the local autoscaler
  const { LocalAutoscaler, readScalePolicy, spawnWorker } = await import("../infra/local/autoscaler.ts");
  const maxNumSeqs = Number(args["max-num-seqs"]);
  const start = (workerId) =>
    spawnWorker({
      workerId,
      pool: POOL,
      natsUrl: nats.url,
      model: modelDir,
      maxNumSeqs,
      extra: ["--served-model-name", modelName, "--log-level", "warn"],
    });
  let policyMin = 1;
  const nc = await connect({ servers: nats.url });
  cleanups.push(() => nc.close());
  const firstReport = new Promise((resolveReport) => {
    const sub = nc.subscribe(`llama.pool.${POOL}.load`, { max: 1, callback: () => resolveReport() });
    cleanups.push(() => sub.unsubscribe());
  });
  if (args.autoscale) {
    const overrides = { lagThreshold: maxNumSeqs };
    if (args["min-workers"]) overrides.minReplicas = Number(args["min-workers"]);
    if (args["max-workers"]) overrides.maxReplicas = Number(args["max-workers"]);
    const policy = readScalePolicy(undefined, { minReplicas: 1, maxReplicas: 2, ...overrides });
    policyMin = policy.minReplicas;
    const scaler = new LocalAutoscaler({
      pool: POOL,
      nc,
      policy,
      startWorker: start,
      onEvent: (e) => {
        if (e.type === "scale-up" || e.type === "scale-down")
          log(`autoscaler: ${e.type} (lag ${e.lag}) → ${e.replicas} worker(s)`);
      },
    });
    await scaler.start();
    cleanups.push(() => scaler.stop());
    log(`autoscaler: ${policy.minReplicas}–${policy.maxReplicas} workers, lag threshold ${policy.lagThreshold}`);
  } else {
    const procs = Array.from({ length: Number(args.workers) }, (_, i) => start(`${POOL}-${i}`));
    cleanups.push(() =>
      Promise.all(
        procs.map(
          (p) =>
            new Promise((done) => {
              if (p.exitCode !== null) return done();
              p.once("exit", done);
              p.kill("SIGTERM");
            }),
        ),
      ),
    );
    for (const p of procs) {
      p.once("exit", (code) => {
        if (stopping) return;
        log(`a worker exited (${code})`);
        shutdown(1);
      });
    }
  }
  // A pool that may scale to zero starts with none: the first request starts a worker (and waits for it).
  const minWorkers = args.autoscale ? policyMin : Number(args.workers);
  if (minWorkers > 0) {
    log(`loading ${modelName} in the worker(s)…`);
    await firstReport;
  } else log("no worker yet: the first request starts one (its cold start counts against the queue timeout)");

  // 4. the gateway under workerd
  const gw = await startGateway({
    natsWsUrl: nats.wsUrl,
    port: Number(args.port),
    adminSecret: persistentSecret(join(root, ".cache", "edge", "admin-secret")),
    config: { pools: { [POOL]: { max_context: maxContext, models: [modelName] } } },
    logLevel: "warn",
  });
  cleanups.push(() => gw.stop());
  const key = await ensureDevKey(gw, join(root, ".cache", "edge", "dev-key"));

  console.log(`
llama-edge is up.

  OpenAI base URL   ${gw.url}/v1
  API key           ${key}        (development key, kept in .cache/edge/dev-key)
  Admin secret      in .cache/edge/admin-secret
  Model             ${modelName}${source.kind === "default" ? "   (random weights: the output is meaningless text)" : ""}

  curl ${gw.url}/v1/chat/completions \\
    -H "Authorization: Bearer ${key}" -H "Content-Type: application/json" \\
    -d '{"model": "${modelName}", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}'

Press Ctrl-C to stop.
`);
} catch (e) {
  console.error(`[llama-edge] ${e instanceof Error ? e.message : e}`);
  await shutdown(1);
}
