#!/usr/bin/env node
// `npm start`: the whole stack on one machine. nats-server (JetStream + a loopback WebSocket listener for the
// edge), GPU/CPU workers on the default model (or --model), and the gateway on workerd (Miniflare: see
// edge/dev/gateway.mjs for why not `wrangler dev`). Prints the console URL, the OpenAI base URL, a development API
// key and a curl to paste.
//
// It supervises what it started as Kubernetes would (scripts/supervisor.mjs): a process that dies is restarted
// with back-off while the rest keeps running; requests in flight on a dead worker end with the protocol's
// `worker_lost` error (the gateway's heartbeat timeout) and new ones are served once the replacement is ready.
// Ctrl-C or SIGTERM stops everything in order (workers drain their streams first); a second Ctrl-C kills at once.
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join, resolve } from "node:path";
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
  --quantization <q> Weight format: none (f32), int8 or int4 (default none; env LLAMA_QUANTIZATION)
  --threads <n>      ONNX Runtime threads per worker (default: the cores shared among --workers; env
                     LLAMA_THREADS)
  --port <port>      Gateway port (default 8787; 0 = any free port)
  --state-dir <dir>  NATS store, gateway storage, admin secret and development key (default .cache)
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
      quantization: { type: "string" },
      threads: { type: "string" },
      port: { type: "string", default: "8787" },
      "state-dir": { type: "string" },
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
for (const name of ["workers", "max-num-seqs", "port", "min-workers", "max-workers", "threads"]) {
  const v = args[name];
  if (v !== undefined && !/^\d+$/.test(v)) {
    console.error(`--${name}: "${v}" is not a whole number\n\n${USAGE}`);
    process.exit(2);
  }
}

ensureNpmDeps();
// TypeScript modules (model generation, the autoscaler) run through tsx, as the worker CLI does.
const { register } = await import("tsx/esm/api");
register();
const { spawn } = await import("node:child_process");
const { chooseNatsPorts, preferredNatsPorts, spawnNatsServer, waitForNats } = await import("./nats.mjs");
const { freePort, portInUse } = await import("./ports.mjs");
const { Supervisor, exited, hasExited, signalGroup, stopProcess } = await import("./supervisor.mjs");
const { ensureDevKey, persistentSecret } = await import("../edge/dev/gateway.mjs");
const { connect } = await import("@nats-io/transport-node");

const POOL = "default";
const GATEWAY_SCRIPT = join(root, "edge", "dev", "gateway.mjs");
/** Workers drain for up to 25 s on SIGTERM (their --drain-timeout); then they are killed. */
const WORKER_STOP_TIMEOUT_MS = 30_000;
const log = (msg) => console.log(`[llama-edge] ${msg}`);
const stateDir = resolve(args["state-dir"] ?? join(root, ".cache"));

const sup = new Supervisor({ log });
/** @type {import("../infra/local/autoscaler.ts").LocalAutoscaler | undefined} */
let scaler;
/** @type {import("@nats-io/nats-core").NatsConnection | undefined} */
let nc;
let stopping;
let firstSignalAt = 0;

/** Everything down, in order: workers (they drain over NATS, through the gateway), the gateway, nats-server. */
function shutdown(code) {
  stopping ??= (async () => {
    log("stopping (workers finish their streams first)…");
    if (scaler) {
      const workers = [...scaler.workers.values()];
      const stopped = scaler.stop().catch(() => {});
      await Promise.all(workers.map((p) => Promise.race([exited(p), stopped]).then(() => stopProcess(p, 0))));
      await Promise.race([stopped, new Promise((r) => setTimeout(r, WORKER_STOP_TIMEOUT_MS))]);
      for (const p of workers) signalGroup(p, "SIGKILL");
    }
    await sup.stop();
    await nc?.close().catch(() => {});
    process.exit(code);
  })();
  return stopping;
}

function onSignal(signal) {
  const now = Date.now();
  if (firstSignalAt === 0) {
    firstSignalAt = now;
    void shutdown(0);
    return;
  }
  // npm forwards the terminal's SIGINT that already reached us: a second one within a second is the same Ctrl-C.
  if (now - firstSignalAt < 1000) return;
  log(`${signal} again: killing everything now`);
  killEverything();
  process.exit(130);
}

function killEverything() {
  sup.killAll();
  for (const p of scaler?.workers.values() ?? []) signalGroup(p, "SIGKILL");
}

for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) process.on(signal, onSignal);
// Whatever ends this process, no child is left behind.
process.on("exit", killEverything);
process.on("uncaughtException", (e) => {
  console.error(`[llama-edge] ${e.stack ?? e}`);
  killEverything();
  process.exit(1);
});

try {
  // 1. the model, resolved (and downloaded) once here, as `llama-worker` resolves it; the workers get its directory
  const { resolveModel } = await import("../gpu-worker/src/model/model-source.ts");
  const source = await resolveModel(args.model, { tty: process.stderr.isTTY === true, log: (line) => log(line) });
  const modelDir = source.dir;
  const config = JSON.parse(readFileSync(join(modelDir, "config.json"), "utf8"));
  const modelName = source.name;
  const maxContext = config.max_position_embeddings ?? 2048;

  let port = Number(args.port);
  if (port === 0) port = await freePort();
  else if (await portInUse(port)) throw new Error(`port ${port} is in use: pick another with --port`);

  // 2. NATS: ours on the default ports, or on free ones when something (a packaged nats-server) holds them
  const nats = await chooseNatsPorts(preferredNatsPorts());
  const natsUrl = `nats://127.0.0.1:${nats.port}`;
  const natsWsUrl = `ws://127.0.0.1:${nats.wsPort}`;
  if (nats.taken.length > 0) {
    log(
      `port(s) ${nats.taken.join(", ")} already in use (another nats-server, e.g. the system's nats-server.service?): ` +
        "running our own on free ports instead",
    );
  }
  const natsDir = join(stateDir, "nats");
  sup.add("nats-server", {
    start: () =>
      spawnNatsServer({ ...nats, dir: natsDir, storeDir: join(natsDir, "jetstream"), detached: true, stdio: "ignore" })
        .proc,
    ready: (proc) => waitForNats(nats.httpPort, 15_000, proc),
    onStart: (proc) =>
      log(
        `nats-server: pid ${proc.pid}, ${natsUrl} (WebSocket ${natsWsUrl}, monitoring http://127.0.0.1:${nats.httpPort})`,
      ),
    stage: 0,
    stopTimeoutMs: 5000,
  });
  await sup.ready("nats-server");
  // The supervisor's own connection: it sees the workers' load reports (readiness) and survives NATS restarts.
  nc = await connect({ servers: natsUrl, name: "llama-edge start", maxReconnectAttempts: -1, reconnectTimeWait: 250 });
  const loadReports = new Map(); // worker id -> callbacks waiting for its next report
  nc.subscribe(`llama.pool.${POOL}.load`, {
    callback: (err, msg) => {
      if (err) return;
      let id;
      try {
        id = msg.json().worker_id;
      } catch {
        return;
      }
      for (const done of loadReports.get(id) ?? []) done();
      loadReports.delete(id);
    },
  });
  /** Resolves at the worker's next load report: it is pulling requests. Rejects if it exits first. */
  const nextLoadReport = (workerId, proc) =>
    new Promise((resolveReport, rejectReport) => {
      if (!loadReports.has(workerId)) loadReports.set(workerId, []);
      loadReports.get(workerId).push(resolveReport);
      void exited(proc).then(() => rejectReport(new Error(`${workerId} exited`)));
    });

  // 3. the gateway on workerd; its secret and config travel in the environment, never on the command line
  const gatewayUrl = `http://127.0.0.1:${port}`;
  const adminSecret = persistentSecret(join(stateDir, "edge", "admin-secret"));
  const gatewayConfig = {
    pools: { [POOL]: { max_context: maxContext, models: [modelName] } },
    // Development: responses name the worker that served them (x-llama-edge-worker).
    expose_worker_id: true,
  };
  sup.add("gateway", {
    start: () =>
      spawn(
        process.execPath,
        [GATEWAY_SCRIPT, "--port", String(port), "--persist-to", join(stateDir, "edge", "state")],
        {
          stdio: ["ignore", "ignore", "inherit"],
          detached: true,
          env: {
            ...process.env,
            NATS_URL: natsWsUrl,
            ADMIN_SECRET: adminSecret,
            GATEWAY_CONFIG: JSON.stringify(gatewayConfig),
          },
        },
      ),
    ready: (proc) => waitForHealth(`${gatewayUrl}/health`, proc),
    onStart: (proc) => log(`gateway: pid ${proc.pid}, ${gatewayUrl}`),
    stage: 1,
    stopTimeoutMs: 10_000,
  });

  // 4. workers: a fixed number under the supervisor, or the local autoscaler
  const { LocalAutoscaler, readScalePolicy, spawnWorker } = await import("../infra/local/autoscaler.ts");
  const maxNumSeqs = Number(args["max-num-seqs"]);
  const quantization = args.quantization ?? process.env.LLAMA_QUANTIZATION;
  // Workers on one machine share its cores: each gets its share rather than all of them spinning against each other.
  const threadsPerWorker = Number(
    args.threads ??
      process.env.LLAMA_THREADS ??
      Math.max(1, Math.floor(availableParallelism() / Math.max(1, Number(args.workers)))),
  );
  const spawnPoolWorker = (workerId, healthPort) =>
    spawnWorker({
      workerId,
      pool: POOL,
      natsUrl,
      model: modelDir,
      maxNumSeqs,
      // The served name: the repo id of a Hub model (its snapshot directory is named after a commit). Quiet
      // unless asked: LLAMA_LOG_LEVEL=info npm start shows the workers' request logs.
      extra: [
        ...["--served-model-name", modelName, "--log-level", process.env.LLAMA_LOG_LEVEL ?? "warn"],
        ...["--health-port", String(healthPort), "--threads", String(threadsPerWorker)],
        ...(quantization ? ["--quantization", quantization] : []),
      ],
    });
  let workersReady;
  if (args.autoscale) {
    const overrides = { lagThreshold: maxNumSeqs };
    if (args["min-workers"]) overrides.minReplicas = Number(args["min-workers"]);
    if (args["max-workers"]) overrides.maxReplicas = Number(args["max-workers"]);
    const policy = readScalePolicy(undefined, { minReplicas: 1, maxReplicas: 2, ...overrides });
    const firstReport = new Promise((r) => nc.subscribe(`llama.pool.${POOL}.load`, { max: 1, callback: () => r() }));
    scaler = new LocalAutoscaler({
      pool: POOL,
      nc,
      policy,
      startWorker: (id) => spawnPoolWorker(id, 0),
      onEvent: (e) => {
        if (e.type === "scale-up" || e.type === "scale-down")
          log(`autoscaler: ${e.type} (lag ${e.lag}) → ${e.replicas} worker(s)`);
        // A crashed worker is replaced at the next poll, when the lag still asks for it.
        if (e.type === "worker-exit" && !sup.stopping) log(`${e.workerId} exited (code ${e.code})`);
      },
    });
    await scaler.start();
    log(`autoscaler: ${policy.minReplicas}–${policy.maxReplicas} workers, lag threshold ${policy.lagThreshold}`);
    workersReady = policy.minReplicas > 0 ? firstReport : Promise.resolve();
  } else {
    const names = Array.from({ length: Number(args.workers) }, (_, i) => `${POOL}-${i}`);
    for (const workerId of names) {
      let healthPort = 0;
      sup.add(`worker ${workerId}`, {
        // A known metrics port, printed, so that `curl …/metrics` works on the local stack.
        start: async () => {
          healthPort = await freePort();
          return spawnPoolWorker(workerId, healthPort);
        },
        ready: async (proc) => {
          await nextLoadReport(workerId, proc);
          log(`worker ${workerId}: ready`);
        },
        onStart: (proc) => log(`worker ${workerId}: pid ${proc.pid}, metrics http://127.0.0.1:${healthPort}/metrics`),
        stage: 2,
        stopTimeoutMs: WORKER_STOP_TIMEOUT_MS,
      });
    }
    workersReady = Promise.all(names.map((n) => sup.ready(`worker ${n}`)));
  }
  log(`loading ${modelName} in the worker(s)…`);
  await Promise.all([sup.ready("gateway"), workersReady]);

  const gw = { url: gatewayUrl, port, adminSecret };
  const key = await ensureDevKey(gw, join(stateDir, "edge", "dev-key"));
  console.log(`
llama-edge is up.

  Web console       ${gw.url}/        (Playground, Usage, Admin: paste the key or the admin secret there)
  OpenAI base URL   ${gw.url}/v1
  API key           ${key}        (development key, kept in ${join(stateDir, "edge", "dev-key")})
  Admin secret      in ${join(stateDir, "edge", "admin-secret")}
  Model             ${modelName}${source.kind === "default" ? "   (random weights: the output is meaningless text)" : ""}

  curl ${gw.url}/v1/chat/completions \\
    -H "Authorization: Bearer ${key}" -H "Content-Type: application/json" \\
    -d '{"model": "${modelName}", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}'

Press Ctrl-C to stop.
`);
} catch (e) {
  if (!stopping) {
    console.error(`[llama-edge] ${e instanceof Error ? e.message : e}`);
    await shutdown(1);
  }
}

/** Polls `url` until it answers 200; rejects if `proc` exits first. */
async function waitForHealth(url, proc) {
  while (!hasExited(proc)) {
    try {
      if ((await fetch(url)).ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error("exited");
}
