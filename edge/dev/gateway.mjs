// Runs the gateway under workerd, offline, on a chosen or free loopback port: with Miniflare (the bundle
// `wrangler deploy` would upload, served by workerd with nothing in front: what `npm start` runs) or under
// `wrangler dev`. Used by `npm start` (scripts/start.mjs), the end-to-end tests (test/) and edge/bench/ttft.ts.
//
//   const gw = await startGateway({ natsWsUrl: "ws://127.0.0.1:4223" });
//   const key = await ensureDevKey(gw, ".cache/edge/dev-key");   // created once, reused afterwards
//   ... fetch(`${gw.url}/v1/models`, { headers: { authorization: `Bearer ${key}` } })
//   await gw.stop();
//
// As a process (what the supervisor in scripts/start.mjs runs): the Workers variables come from the environment,
// so secrets never show in the process list.
//
//   NATS_URL=ws://127.0.0.1:4223 ADMIN_SECRET=… [GATEWAY_CONFIG='{…}'] [DISPATCH_SHARDS=4] \
//     node edge/dev/gateway.mjs --port 8787 [--persist-to DIR]
//
// Why not `wrangler dev`: its development proxy (a Durable Object in front of the Worker) breaks when a response
// goes out before the request body has been read, e.g. a 413 for an oversized chunked upload: the proxy throws
// "Can't read from request stream after response has been sent" (workerd issue #918) and the next request, from
// any client, hangs or gets a plain-text 503 "Your worker restarted mid-request". Production has no such proxy,
// and neither does Miniflare.
import { spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { freePort } from "../../scripts/ports.mjs";

const edgeDir = join(dirname(fileURLToPath(import.meta.url)), "..");
const repoRoot = join(edgeDir, "..");

/** A secret stored in `file` (created with a random value on first use, mode 600). */
export function persistentSecret(file) {
  if (existsSync(file)) return readFileSync(file, "utf8").trim();
  mkdirSync(dirname(file), { recursive: true });
  const secret = randomBytes(24).toString("base64url");
  writeFileSync(file, `${secret}\n`, { mode: 0o600 });
  return secret;
}

/**
 * Starts the gateway and resolves once it answers /health: with Miniflare (default; what `npm start` runs: workerd
 * without wrangler's development proxy in front, as in production), or with `runtime: "wrangler"` under
 * `wrangler dev` (see the note at the top about its proxy).
 * @param {import("./gateway.d.mts").GatewayOptions} opts
 * @returns {Promise<import("./gateway.d.mts").Gateway>}
 */
export async function startGateway(opts) {
  const port = opts.port ?? (await freePort());
  const adminSecret = opts.adminSecret ?? randomBytes(24).toString("base64url");
  const persistTo = opts.persistTo ?? join(repoRoot, ".cache", "edge", "state");
  const vars = {
    NATS_URL: opts.natsWsUrl,
    ADMIN_SECRET: adminSecret,
    ...(opts.config ? { GATEWAY_CONFIG: JSON.stringify(opts.config) } : {}),
    ...(opts.shards ? { DISPATCH_SHARDS: String(opts.shards) } : {}),
  };
  if ((opts.runtime ?? "miniflare") === "miniflare") return startMiniflare({ port, adminSecret, persistTo, vars });
  // Variables (the admin secret among them) go through a private env file, never the command line.
  const varsDir = mkdtempSync(join(tmpdir(), "llama-edge-vars-"));
  const envFile = join(varsDir, ".dev.vars");
  writeFileSync(
    envFile,
    Object.entries(vars)
      .map(([k, v]) => `${k}=${dotenvQuote(v)}\n`)
      .join(""),
    { mode: 0o600 },
  );
  const inspectorPort = await freePort();
  const args = [
    join(repoRoot, "node_modules", "wrangler", "bin", "wrangler.js"),
    "dev",
    "--config",
    join(edgeDir, "wrangler.jsonc"),
    "--ip",
    "127.0.0.1",
    "--port",
    String(port),
    "--inspector-port",
    String(inspectorPort),
    "--persist-to",
    persistTo,
    "--show-interactive-dev-session=false",
    "--log-level",
    opts.logLevel ?? "warn",
    "--env-file",
    envFile,
  ];
  const proc = spawn(process.execPath, args, {
    cwd: edgeDir,
    stdio: opts.stdio ?? ["ignore", "inherit", "inherit"],
    env: wranglerEnv(),
  });
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  const url = `http://127.0.0.1:${port}`;
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(timer);
    rmSync(varsDir, { recursive: true, force: true });
  };
  const until = Date.now() + (opts.timeoutMs ?? 60_000);
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      rmSync(varsDir, { recursive: true, force: true });
      throw new Error(`wrangler dev exited (${proc.exitCode ?? proc.signalCode})`);
    }
    try {
      const r = await fetch(`${url}/health`);
      if (r.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > until) {
      await stop();
      throw new Error(`the gateway did not answer on ${url} within ${opts.timeoutMs ?? 60_000} ms`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  return { url, port, adminSecret, stop };
}

/** A value for a dotenv file (wrangler parses `.dev.vars` with dotenv): quoted literally, one line. */
function dotenvQuote(value) {
  const quote = ["'", "`", '"'].find((q) => !value.includes(q));
  if (quote === undefined || /[\r\n]/.test(value))
    throw new Error(`cannot write ${JSON.stringify(value)} to .dev.vars`);
  return `${quote}${value}${quote}`;
}

const wranglerEnv = () => ({
  ...process.env,
  // Offline and quiet: no telemetry, no request.cf lookups.
  WRANGLER_SEND_METRICS: "false",
  CLOUDFLARE_CF_FETCH_ENABLED: "false",
  WRANGLER_HIDE_BANNER: "true",
});

/** Bundles the gateway as `wrangler deploy` would, and serves the bundle with Miniflare. */
async function startMiniflare({ port, adminSecret, persistTo, vars }) {
  const configPath = join(edgeDir, "wrangler.jsonc");
  const outdir = mkdtempSync(join(tmpdir(), "llama-edge-bundle-"));
  const wrangler = join(repoRoot, "node_modules", "wrangler", "bin", "wrangler.js");
  const r = spawnSync(process.execPath, [wrangler, "deploy", "--dry-run", "--outdir", outdir, "--config", configPath], {
    cwd: edgeDir,
    encoding: "utf8",
    env: wranglerEnv(),
  });
  if (r.status !== 0) throw new Error(`bundling the gateway failed:\n${r.stdout}\n${r.stderr}`);
  const { Miniflare } = await import("miniflare");
  const { unstable_getMiniflareWorkerOptions } = await import("wrangler");
  const { workerOptions } = unstable_getMiniflareWorkerOptions(configPath);
  const mf = new Miniflare({
    ...workerOptions,
    modules: true,
    modulesRoot: outdir,
    scriptPath: join(outdir, "index.js"),
    bindings: { ...workerOptions.bindings, ...vars },
    host: "127.0.0.1",
    port,
    durableObjectsPersist: join(persistTo, "do"),
  });
  await mf.ready;
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    adminSecret,
    stop: async () => {
      await mf.dispose();
      rmSync(outdir, { recursive: true, force: true });
    },
  };
}

/** Calls the admin API. */
export async function admin(gw, method, path, body) {
  const res = await fetch(`${gw.url}/admin${path}`, {
    method,
    headers: { authorization: `Bearer ${gw.adminSecret}`, "content-type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const json = await res.json();
  if (!res.ok) throw new Error(`admin ${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

/**
 * The development API key: read from `file` if the gateway still knows it, else created through the admin API
 * (stored like any other key: only its hash in the gateway) and written to `file` (mode 600).
 */
export async function ensureDevKey(gw, file) {
  if (existsSync(file)) {
    const key = readFileSync(file, "utf8").trim();
    const r = await fetch(`${gw.url}/v1/models`, { headers: { authorization: `Bearer ${key}` } });
    if (r.ok) return key;
  }
  const { key } = await admin(gw, "POST", "/keys", { name: "development" });
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, `${key}\n`, { mode: 0o600 });
  chmodSync(file, 0o600);
  return key;
}

const USAGE = `Usage: NATS_URL=ws://… ADMIN_SECRET=… node edge/dev/gateway.mjs [--port <port>] [--persist-to <dir>]

Serves the gateway with Miniflare until SIGTERM or Ctrl-C. Workers variables come from the environment:
NATS_URL (required), ADMIN_SECRET, GATEWAY_CONFIG (JSON), DISPATCH_SHARDS.
`;

/** The command line: one gateway until a signal; prints "ready <url>" once it answers. */
async function main() {
  let args;
  try {
    ({ values: args } = parseArgs({
      options: { port: { type: "string" }, "persist-to": { type: "string" }, help: { type: "boolean", short: "h" } },
    }));
  } catch (e) {
    console.error(`${e.message}\n\n${USAGE}`);
    return 2;
  }
  if (args.help) {
    console.log(USAGE);
    return 0;
  }
  const env = process.env;
  if (!env.NATS_URL) {
    console.error(`NATS_URL is not set\n\n${USAGE}`);
    return 2;
  }
  const gw = await startGateway({
    natsWsUrl: env.NATS_URL,
    port: args.port === undefined ? undefined : Number(args.port),
    persistTo: args["persist-to"],
    adminSecret: env.ADMIN_SECRET ?? "", // unset: the admin API stays disabled
    config: env.GATEWAY_CONFIG ? JSON.parse(env.GATEWAY_CONFIG) : undefined,
    shards: env.DISPATCH_SHARDS ? Number(env.DISPATCH_SHARDS) : undefined,
  });
  console.log(`ready ${gw.url}`);
  await new Promise((resolve) => {
    process.once("SIGTERM", resolve);
    process.once("SIGINT", resolve);
  });
  await gw.stop();
  return 0;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  main().then(
    (code) => process.exit(code),
    (e) => {
      console.error(`gateway: ${e instanceof Error ? e.message : e}`);
      process.exit(1);
    },
  );
}
