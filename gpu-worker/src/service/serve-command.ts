/**
 * `llama-worker serve`: load the model into an engine thread, join a worker pool over NATS, serve health and
 * metrics over HTTP, and drain on SIGTERM (what a Kubernetes scale-down sends). Every flag has an environment
 * variable, for container specs.
 *
 * @module
 */
import { readFileSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { isValidPoolName } from "@llama-edge/shared";
import { type ConnectionOptions, credsAuthenticator } from "@nats-io/nats-core";
import { pino } from "pino";
import { removeCompileTemps } from "../model/compiled-dir.ts";
import { cacheDir } from "../model/default-model.ts";
import { resolveModel } from "../model/model-source.ts";
import { parseQuantization, type Quantization } from "../model/quantize.ts";
import { EngineHost } from "./engine-host.ts";
import { type HealthServer, startHealthServer } from "./health-server.ts";
import { type ColdStartPhase, WorkerMetrics } from "./metrics.ts";
import { NatsWorker } from "./nats-worker.ts";

export const SERVE_USAGE = `Usage: llama-worker serve [options]

Joins a worker pool over NATS and serves its requests. Each option can also be set by the environment variable
shown; the flag wins.

  --model <m>                   LLAMA_MODEL             A checkpoint directory, a compiled directory
                                                        (llama-worker compile), or a Hugging Face repo id
                                                        org/name[@revision] (default: the generated default
                                                        model, random weights)
  --pool <name>                 LLAMA_POOL              Worker pool, [a-z0-9-]+ (default "default")
  --nats <url[,url]>            NATS_URL                NATS server(s) (default nats://127.0.0.1:4222)
  --worker-id <id>              LLAMA_WORKER_ID         Name in events, logs, load reports (default host-pid)
  --served-model-name <name>    LLAMA_SERVED_MODEL_NAME Model name(s) requests may use, comma-separated
                                                        (default: the repo id, or the directory's name)
  --max-num-seqs <n>            LLAMA_MAX_NUM_SEQS      Sequences running at once (default 64)
  --max-model-len <n>           LLAMA_MAX_MODEL_LEN     Longest sequence (prompt + completion) served (default
                                                        and maximum: the model's max_position_embeddings)
  --max-num-batched-tokens <n>  LLAMA_MAX_NUM_BATCHED_TOKENS
  --block-size <n>              LLAMA_BLOCK_SIZE
  --kv-cache-bytes <n>          LLAMA_KV_CACHE_BYTES
  --no-prefix-caching           LLAMA_NO_PREFIX_CACHING=1
  --device <cpu|cuda>           LLAMA_DEVICE            ONNX Runtime execution provider (default cpu)
  --quantization <q>            LLAMA_QUANTIZATION      Weight format: none (f32), int8 or int4 (default none)
  --threads <n>                 LLAMA_THREADS           ONNX Runtime intra-op threads (default: every core,
                                                        os.availableParallelism())
  --kv-free-watermark <f>       LLAMA_KV_FREE_WATERMARK Pull only while this fraction of KV blocks is free
                                                        (default 0.05)
  --ack-wait <s>                LLAMA_ACK_WAIT          ack_wait of the pool's consumer when this worker
                                                        creates it (default 30)
  --stream-replicas <n>         LLAMA_STREAM_REPLICAS   Replicas of the pool's stream when this worker
                                                        creates it (default 1; 3 in a NATS cluster)
  --drain-timeout <s>           LLAMA_DRAIN_TIMEOUT     Grace period for requests in flight on SIGTERM
                                                        (default 25, under Kubernetes' default 30)
  --health-port <port>          LLAMA_HEALTH_PORT       /healthz, /readyz, /metrics (default 8080, 0 = any)
  --log-level <level>           LLAMA_LOG_LEVEL         pino level (default info)

NATS credentials come from the environment only (flags would show in the process list):
  NATS_USER + NATS_PASSWORD, or NATS_TOKEN, or NATS_CREDS (path of a .creds file: JWT + NKey seed).
A Hub model is downloaded as huggingface_hub does: HF_ENDPOINT, HF_TOKEN, HF_HOME (the cache), HF_HUB_OFFLINE.
`;

const OPTIONS = {
  model: { type: "string", env: "LLAMA_MODEL" },
  pool: { type: "string", env: "LLAMA_POOL" },
  nats: { type: "string", env: "NATS_URL" },
  "worker-id": { type: "string", env: "LLAMA_WORKER_ID" },
  "served-model-name": { type: "string", env: "LLAMA_SERVED_MODEL_NAME" },
  "max-num-seqs": { type: "string", env: "LLAMA_MAX_NUM_SEQS" },
  "max-model-len": { type: "string", env: "LLAMA_MAX_MODEL_LEN" },
  "max-num-batched-tokens": { type: "string", env: "LLAMA_MAX_NUM_BATCHED_TOKENS" },
  "block-size": { type: "string", env: "LLAMA_BLOCK_SIZE" },
  "kv-cache-bytes": { type: "string", env: "LLAMA_KV_CACHE_BYTES" },
  "no-prefix-caching": { type: "boolean", env: "LLAMA_NO_PREFIX_CACHING" },
  device: { type: "string", env: "LLAMA_DEVICE" },
  quantization: { type: "string", env: "LLAMA_QUANTIZATION" },
  threads: { type: "string", env: "LLAMA_THREADS" },
  "kv-free-watermark": { type: "string", env: "LLAMA_KV_FREE_WATERMARK" },
  "ack-wait": { type: "string", env: "LLAMA_ACK_WAIT" },
  "stream-replicas": { type: "string", env: "LLAMA_STREAM_REPLICAS" },
  "drain-timeout": { type: "string", env: "LLAMA_DRAIN_TIMEOUT" },
  "health-port": { type: "string", env: "LLAMA_HEALTH_PORT" },
  "log-level": { type: "string", env: "LLAMA_LOG_LEVEL" },
  help: { type: "boolean", short: "h" },
} as const;

type OptionName = Exclude<keyof typeof OPTIONS, "help">;

class UsageError extends Error {}

/** Reads flags, then environment variables. */
function readOptions(argv: string[]) {
  const { values } = parseArgs({ args: argv, options: OPTIONS, strict: true, allowPositionals: false });
  const str = (name: OptionName): string | undefined => {
    const v = values[name];
    if (typeof v === "string") return v;
    const env = process.env[OPTIONS[name].env];
    return env === undefined || env === "" ? undefined : env;
  };
  const flag = (name: OptionName): boolean => {
    if (values[name] === true) return true;
    const env = process.env[OPTIONS[name].env];
    return env !== undefined && !["", "0", "false", "no"].includes(env.toLowerCase());
  };
  const num = (name: OptionName, check: (n: number) => boolean = (n) => n > 0): number | undefined => {
    const v = str(name);
    if (v === undefined) return undefined;
    const n = Number(v);
    if (v.trim() === "" || !Number.isFinite(n) || !check(n)) throw new UsageError(`--${name}: invalid value "${v}"`);
    return n;
  };
  const pool = str("pool") ?? "default";
  if (!isValidPoolName(pool)) throw new UsageError(`--pool: "${pool}" is not a valid pool name ([a-z0-9-]+)`);
  const device = str("device") ?? "cpu";
  if (device !== "cpu" && device !== "cuda") throw new UsageError(`--device must be cpu or cuda, got "${device}"`);
  let quantization: Quantization;
  try {
    quantization = parseQuantization(str("quantization"));
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  return {
    help: values.help === true,
    model: str("model"),
    pool,
    nats: (str("nats") ?? "nats://127.0.0.1:4222").split(",").map((s) => s.trim()),
    workerId: str("worker-id") ?? `${hostname()}-${process.pid}`,
    servedModelNames: str("served-model-name")
      ?.split(",")
      .map((s) => s.trim())
      .filter(Boolean),
    maxNumSeqs: num("max-num-seqs", Number.isInteger),
    maxModelLen: num("max-model-len", Number.isInteger),
    maxNumBatchedTokens: num("max-num-batched-tokens", Number.isInteger),
    blockSize: num("block-size", Number.isInteger),
    kvCacheBytes: num("kv-cache-bytes"),
    enablePrefixCaching: !flag("no-prefix-caching"),
    device: device as "cpu" | "cuda",
    quantization,
    numThreads: num("threads", (n) => Number.isInteger(n) && n >= 1),
    kvFreeWatermark: num("kv-free-watermark", (n) => n >= 0 && n < 1),
    ackWaitS: num("ack-wait") ?? 30,
    streamReplicas: num("stream-replicas", (n) => Number.isInteger(n) && n >= 1 && n <= 5) ?? 1,
    drainTimeoutS: num("drain-timeout", (n) => n >= 0) ?? 25,
    healthPort: num("health-port", (n) => Number.isInteger(n) && n >= 0 && n < 65536) ?? 8080,
    logLevel: str("log-level") ?? "info",
  };
}

/** Where the engine packs checkpoints' weights (compiled-model.ts) when given a checkpoint, not a compiled dir. */
const compiledCacheDir = () => join(cacheDir(), "compiled");

/** Credentials from NATS_USER/NATS_PASSWORD, NATS_TOKEN or NATS_CREDS. */
function natsAuth(env: NodeJS.ProcessEnv): Omit<ConnectionOptions, "servers" | "name"> {
  if (env.NATS_CREDS) return { authenticator: credsAuthenticator(readFileSync(env.NATS_CREDS)) };
  if (env.NATS_TOKEN) return { token: env.NATS_TOKEN };
  if (env.NATS_USER) return { user: env.NATS_USER, pass: env.NATS_PASSWORD ?? "" };
  return {};
}

/**
 * Runs until SIGTERM/SIGINT (drains, then returns 0) or a failure (model load, engine crash: logged, returns 1).
 * A signal while the model is still loading, or a second signal, exits the process at once. Returns 2 on bad usage.
 */
export async function serveCommand(argv: string[]): Promise<number> {
  let o: ReturnType<typeof readOptions>;
  try {
    o = readOptions(argv);
  } catch (e) {
    if (e instanceof UsageError || (e as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`llama-worker serve: ${(e as Error).message}\n\n${SERVE_USAGE}`);
      return 2;
    }
    throw e;
  }
  if (o.help) {
    process.stdout.write(SERVE_USAGE);
    return 0;
  }
  const logger = pino({
    level: o.logLevel,
    base: { worker_id: o.workerId, pool: o.pool },
    timestamp: pino.stdTimeFunctions.isoTime,
  });

  let host: EngineHost | undefined;
  let worker: NatsWorker | undefined;
  let metrics: WorkerMetrics | undefined;
  let health: HealthServer | undefined;
  let crashed = false;
  // Signals first: a pod may be told to stop while it is still loading the model.
  const stop = new AbortController();
  let signals = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    signals++;
    if (signals > 1) {
      logger.warn({ signal: sig }, "second signal: exiting without draining");
      process.exit(1);
    }
    logger.info({ signal: sig }, "shutting down");
    if (!host) {
      // Still loading the model (minutes for a big one): nothing to drain, and no reason to make Kubernetes wait.
      // The engine thread may be packing weights into a temp dir: remove it, or it would fill the cache volume.
      for (const path of removeCompileTemps(compiledCacheDir(), { pid: process.pid }))
        logger.info({ path }, "removed the interrupted compile's temp dir");
      logger.flush();
      process.exit(0);
    }
    stop.abort();
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);

  try {
    health = await startHealthServer(o.healthPort, {
      live: () => !crashed,
      notReadyReason: () =>
        !host
          ? "loading the model"
          : !worker
            ? "connecting to NATS"
            : worker.draining
              ? "draining"
              : worker.connected
                ? null
                : "NATS disconnected",
      registry: () => metrics?.registry ?? null,
    });
    logger.info({ port: health.port }, "health server listening");

    for (const path of removeCompileTemps(compiledCacheDir()))
      logger.info({ path }, "removed a compile temp dir left by a killed worker");
    const initSeconds = performance.now() / 1000;
    const source = await resolveModel(o.model, { log: (msg, fields) => logger.info(fields ?? {}, msg) });
    logger.info({ model_dir: source.dir, model: source.name, origin: source.origin }, "loading model");
    let lastProgressLog = 0;
    host = await EngineHost.start({
      onProgress: (stage, done, total) => {
        if (Date.now() - lastProgressLog < 10_000 && done < total) return;
        lastProgressLog = Date.now();
        logger.info({ stage, done, total }, `${stage}: ${done}/${total}`);
      },
      engineOptions: {
        modelDir: source.dir,
        maxNumSeqs: o.maxNumSeqs,
        maxModelLen: o.maxModelLen,
        maxNumBatchedTokens: o.maxNumBatchedTokens,
        blockSize: o.blockSize,
        kvCacheBytes: o.kvCacheBytes,
        enablePrefixCaching: o.enablePrefixCaching,
        executionProvider: o.device,
        quantization: o.quantization,
        numThreads: o.numThreads,
      },
    });
    void host.exited.then((err) => {
      if (!err) return;
      crashed = true;
      logger.fatal({ err }, "engine thread died");
      stop.abort();
    });
    logger.info({ config: host.config }, "model loaded");

    const servedModelNames = o.servedModelNames ?? [source.name];
    metrics = new WorkerMetrics(
      { pool: o.pool, worker_id: o.workerId, model: servedModelNames[0] ?? source.name },
      () => (host ? host.stats() : null),
      () => (worker ? worker.poolLag() : Promise.resolve(null)),
    );
    const coldStart: Record<ColdStartPhase, number> = {
      init: initSeconds,
      download: source.fetchSeconds,
      compile: host.startup.compileSeconds,
      load: host.startup.loadSeconds,
      connect: 0,
    };
    const connectStarted = performance.now();
    if (stop.signal.aborted) return crashed ? 1 : 0;
    worker =
      (await NatsWorker.start({
        servers: o.nats,
        connectionOptions: natsAuth(process.env),
        pool: o.pool,
        workerId: o.workerId,
        engine: host,
        logger,
        metrics,
        servedModelNames,
        kvFreeWatermark: o.kvFreeWatermark,
        poolSetup: { ackWaitMs: o.ackWaitS * 1000, replicas: o.streamReplicas },
        signal: stop.signal,
      })) ?? undefined;
    if (!worker) return crashed ? 1 : 0; // stopped while connecting
    coldStart.connect = (performance.now() - connectStarted) / 1000;
    for (const [phase, seconds] of Object.entries(coldStart)) metrics.coldStartSeconds.set({ phase }, seconds);
    const total = Object.values(coldStart).reduce((a, b) => a + b, 0);
    logger.info(
      {
        cold_start_s: Object.fromEntries(Object.entries(coldStart).map(([k, v]) => [k, Math.round(v * 1000) / 1000])),
        total_s: Math.round(total * 1000) / 1000,
      },
      "cold start",
    );
    logger.info({ nats: o.nats, served_model_names: servedModelNames }, "ready");

    if (!stop.signal.aborted) {
      await new Promise((resolve) => stop.signal.addEventListener("abort", resolve, { once: true }));
    }
    if (crashed) {
      await worker.close();
      return 1;
    }
    await worker.drain(o.drainTimeoutS * 1000);
    return 0;
  } catch (e) {
    logger.fatal({ err: e }, "worker failed");
    return 1;
  } finally {
    process.off("SIGTERM", onSignal);
    process.off("SIGINT", onSignal);
    if (worker && !worker.draining) await worker.close().catch(() => {});
    await host?.close().catch(() => {});
    await health?.close();
    logger.info("stopped");
    logger.flush();
  }
}
