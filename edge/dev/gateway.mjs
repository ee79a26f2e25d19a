// Runs the gateway under workerd with `wrangler dev`, offline, on a chosen or free loopback port. Used by
// `npm start` (scripts/start.mjs), the end-to-end tests (test/e2e-*.test.ts) and edge/bench/ttft.ts.
//
//   const gw = await startGateway({ natsWsUrl: "ws://127.0.0.1:4223" });
//   const key = await ensureDevKey(gw, ".cache/edge/dev-key");   // created once, reused afterwards
//   ... fetch(`${gw.url}/v1/models`, { headers: { authorization: `Bearer ${key}` } })
//   await gw.stop();
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const edgeDir = join(dirname(fileURLToPath(import.meta.url)), "..");
const repoRoot = join(edgeDir, "..");

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const addr = s.address();
      s.close(() => resolve(typeof addr === "object" && addr ? addr.port : 0));
    });
  });
}

/** A secret stored in `file` (created with a random value on first use, mode 600). */
export function persistentSecret(file) {
  if (existsSync(file)) return readFileSync(file, "utf8").trim();
  mkdirSync(dirname(file), { recursive: true });
  const secret = randomBytes(24).toString("base64url");
  writeFileSync(file, `${secret}\n`, { mode: 0o600 });
  return secret;
}

/**
 * Starts the gateway and resolves once it answers /health: under `wrangler dev` (default; what `npm start` runs),
 * or with `runtime: "miniflare"` on workerd without wrangler's development proxy in front (one HTTP hop less, as
 * in production; the TTFT benchmark uses it).
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
  if (opts.runtime === "miniflare") return startMiniflare({ port, adminSecret, persistTo, vars });
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
    ...Object.entries(vars).flatMap(([k, v]) => ["--var", `${k}:${v}`]),
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
  };
  const until = Date.now() + (opts.timeoutMs ?? 60_000);
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`wrangler dev exited with code ${proc.exitCode}`);
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

const wranglerEnv = () => ({
  ...process.env,
  // Offline and quiet: no telemetry, no request.cf lookups.
  WRANGLER_SEND_METRICS: "false",
  CLOUDFLARE_CF_FETCH_ENABLED: "false",
  WRANGLER_HIDE_BANNER: "true",
});

/** Bundles the gateway as `wrangler deploy` would, and serves the bundle with Miniflare. */
async function startMiniflare({ port, adminSecret, persistTo, vars }) {
  const { mkdtempSync, rmSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const { spawnSync } = await import("node:child_process");
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
