#!/usr/bin/env node
// nats-server for the local stack and the tests: find it (or install it on Debian/Ubuntu as root), write its
// config (JetStream with a store under .cache/nats, a loopback WebSocket listener for the edge), start and stop it.
//
//   node scripts/nats.mjs            start in the foreground until Ctrl-C (ports from NATS_PORT, NATS_WS_PORT,
//                                    NATS_HTTP_PORT or the defaults; free ones when those are taken)
//   node scripts/nats.mjs install    only make sure nats-server is installed
import { spawn, spawnSync } from "node:child_process";
import { accessSync, constants, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { delimiter, join } from "node:path";
import { fileURLToPath } from "node:url";
import { root } from "./ensure-deps.mjs";
import { freePort, portInUse } from "./ports.mjs";

/** JetStream landed in 2.2 and the WebSocket listener in 2.2; 2.9 is the oldest we test (Debian 12 ships it). */
const MIN_VERSION = [2, 9, 0];

export const defaultPorts = Object.freeze({ port: 4222, wsPort: 4223, httpPort: 8222 });

function isExecutable(path) {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** Path of a nats-server binary: $NATS_SERVER_BIN, then $PATH, then the sbin folders non-root PATHs lack. */
export function findNatsServer() {
  if (process.env.NATS_SERVER_BIN)
    return isExecutable(process.env.NATS_SERVER_BIN) ? process.env.NATS_SERVER_BIN : null;
  const dirs = [...(process.env.PATH ?? "").split(delimiter), "/usr/sbin", "/usr/local/sbin", "/usr/local/bin"];
  for (const dir of dirs) {
    if (dir && isExecutable(join(dir, "nats-server"))) return join(dir, "nats-server");
  }
  return null;
}

/** [major, minor, patch] of a nats-server binary, from `nats-server --version` ("nats-server: v2.9.10"). */
export function natsServerVersion(bin) {
  const r = spawnSync(bin, ["--version"], { encoding: "utf8" });
  const m = /v?(\d+)\.(\d+)\.(\d+)/.exec(`${r.stdout}${r.stderr}`);
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : null;
}

const atLeast = (v, min) => (v[0] !== min[0] ? v[0] > min[0] : v[1] !== min[1] ? v[1] > min[1] : v[2] >= min[2]);

function isDebianLike() {
  try {
    const osRelease = readFileSync("/etc/os-release", "utf8");
    return /^ID(_LIKE)?=.*\b(debian|ubuntu)\b/m.test(osRelease);
  } catch {
    return false;
  }
}

const HOW_TO_INSTALL = [
  "nats-server (>= 2.9, with JetStream and WebSocket) is required. Install it with one of:",
  "  Debian/Ubuntu:  sudo apt-get install -y nats-server",
  "  macOS:          brew install nats-server",
  "  any platform:   https://github.com/nats-io/nats-server/releases (put nats-server on PATH",
  "                  or point NATS_SERVER_BIN at it)",
].join("\n");

/**
 * Returns the nats-server path, installing it with apt-get when running as root on Debian/Ubuntu. Throws with
 * install instructions otherwise (never sudo on the user's behalf).
 */
export function ensureNatsServer() {
  let bin = findNatsServer();
  if (!bin && process.getuid?.() === 0 && isDebianLike()) {
    console.error("[llama-edge] installing nats-server (apt-get)…");
    const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
    spawnSync("apt-get", ["update", "-qq"], { stdio: "inherit", env });
    spawnSync("apt-get", ["install", "-y", "-qq", "nats-server"], { stdio: "inherit", env });
    bin = findNatsServer();
  }
  if (!bin) throw new Error(HOW_TO_INSTALL);
  const version = natsServerVersion(bin);
  if (!version || !atLeast(version, MIN_VERSION)) {
    throw new Error(`${bin} is version ${version?.join(".") ?? "unknown"}, too old.\n${HOW_TO_INSTALL}`);
  }
  return bin;
}

/**
 * Writes a nats-server config and returns its path. Everything listens on loopback: this is a development and
 * test server, not a deployment (infra/ has that).
 * @param {{ dir: string, port: number, wsPort: number, httpPort: number, storeDir: string, maxPayload?: number }} o
 */
export function writeNatsConfig(o) {
  mkdirSync(o.dir, { recursive: true });
  mkdirSync(o.storeDir, { recursive: true });
  const conf = `# written by scripts/nats.mjs
server_name: llama-edge-dev
listen: "127.0.0.1:${o.port}"
# Monitoring endpoint: /healthz, /jsz (KEDA's nats-jetstream scaler reads /jsz in a cluster)
http: "127.0.0.1:${o.httpPort}"
max_payload: ${o.maxPayload ?? 1048576}
jetstream {
  store_dir: ${JSON.stringify(o.storeDir)}
  max_memory_store: 256MB
  max_file_store: 1GB
}
# The edge (workerd) speaks NATS over WebSocket; TLS would only get in the way on loopback.
websocket {
  listen: "127.0.0.1:${o.wsPort}"
  no_tls: true
  compression: false
}
`;
  const file = join(o.dir, "nats-server.conf");
  writeFileSync(file, conf);
  return file;
}

/**
 * The default ports when all three are free, else three free ones: on a host where the packaged
 * `nats-server.service` (Debian, Ubuntu) holds 4222, the local stack runs its own server beside it rather than
 * reuse one without JetStream or a WebSocket listener. `taken` lists the defaults found in use.
 * @returns {Promise<{ port: number, wsPort: number, httpPort: number, taken: number[] }>}
 */
export async function chooseNatsPorts(preferred = defaultPorts) {
  const wanted = [preferred.port, preferred.wsPort, preferred.httpPort];
  const taken = [];
  for (const p of wanted) if (await portInUse(p)) taken.push(p);
  if (taken.length === 0) return { ...preferred, taken };
  const ports = new Set();
  while (ports.size < 3) ports.add(await freePort());
  const [port, wsPort, httpPort] = ports;
  return { port, wsPort, httpPort, taken };
}

/** Polls the monitoring endpoint until JetStream is up (healthz checks it), or throws after `timeoutMs`. */
export async function waitForNats(httpPort, timeoutMs = 15_000, proc) {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    // A process killed by a signal has exitCode null and signalCode set.
    if (proc && (proc.exitCode !== null || proc.signalCode !== null)) {
      throw new Error(`nats-server exited (${proc.exitCode ?? proc.signalCode})`);
    }
    try {
      const r = await fetch(`http://127.0.0.1:${httpPort}/healthz?js-enabled-only=true`);
      if (r.ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`nats-server did not become healthy on :${httpPort} within ${timeoutMs} ms`);
}

/**
 * Starts nats-server with a config written into `dir` (default `.cache/nats`) and waits until it is healthy.
 * @param {{ dir?: string, port?: number, wsPort?: number, httpPort?: number, storeDir?: string,
 *           maxPayload?: number, stdio?: "inherit" | "ignore" | "pipe", detached?: boolean }} [opts]
 * @returns {Promise<{ proc: import("node:child_process").ChildProcess, url: string, wsUrl: string,
 *   port: number, wsPort: number, httpPort: number, storeDir: string, configFile: string,
 *   stop: () => Promise<void> }>}
 */
export async function startNats(opts = {}) {
  const dir = opts.dir ?? join(root, ".cache", "nats");
  const port = opts.port ?? defaultPorts.port;
  const wsPort = opts.wsPort ?? defaultPorts.wsPort;
  const httpPort = opts.httpPort ?? defaultPorts.httpPort;
  const storeDir = opts.storeDir ?? join(dir, "jetstream");
  if (await portInUse(port)) throw new Error(`port ${port} is in use: is another nats-server running?`);
  const { proc, configFile } = spawnNatsServer({ ...opts, dir, port, wsPort, httpPort, storeDir });
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  try {
    await waitForNats(httpPort, 15_000, proc);
  } catch (e) {
    proc.kill("SIGKILL");
    throw e;
  }
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
    await exited;
  };
  return {
    proc,
    url: `nats://127.0.0.1:${port}`,
    wsUrl: `ws://127.0.0.1:${wsPort}`,
    port,
    wsPort,
    httpPort,
    storeDir,
    configFile,
    stop,
  };
}

/**
 * Writes the config into `o.dir` and starts nats-server without waiting for it (see `waitForNats`): what the
 * supervisor in scripts/start.mjs runs again, with the same ports and store, when the server dies.
 * @param {{ dir: string, port: number, wsPort: number, httpPort: number, storeDir: string, maxPayload?: number,
 *           stdio?: "inherit" | "ignore" | "pipe", detached?: boolean }} o
 */
export function spawnNatsServer(o) {
  const bin = ensureNatsServer();
  const configFile = writeNatsConfig(o);
  // detached: its own process group, so a terminal's Ctrl-C reaches the caller, which stops the server last
  // (after the workers have drained over it).
  const proc = spawn(bin, ["-c", configFile], { stdio: o.stdio ?? "ignore", detached: o.detached ?? false });
  return { proc, configFile };
}

/** The ports to try first: NATS_PORT, NATS_WS_PORT and NATS_HTTP_PORT, else the defaults. */
export function preferredNatsPorts(env = process.env) {
  const port = (name, fallback) => (env[name] ? Number(env[name]) : fallback);
  return {
    port: port("NATS_PORT", defaultPorts.port),
    wsPort: port("NATS_WS_PORT", defaultPorts.wsPort),
    httpPort: port("NATS_HTTP_PORT", defaultPorts.httpPort),
  };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  try {
    if (process.argv[2] === "install") {
      console.log(ensureNatsServer());
    } else {
      const ports = await chooseNatsPorts(preferredNatsPorts());
      if (ports.taken.length) console.error(`[llama-edge] port(s) ${ports.taken.join(", ")} in use: using free ports`);
      const nats = await startNats({ ...ports, stdio: "inherit" });
      console.error(`[llama-edge] nats-server ready: ${nats.url} (WebSocket ${nats.wsUrl}), config ${nats.configFile}`);
      const stop = () => void nats.stop().then(() => process.exit(0));
      process.once("SIGINT", stop);
      process.once("SIGTERM", stop);
    }
  } catch (e) {
    console.error(`[llama-edge] ${e instanceof Error ? e.message : e}`);
    process.exit(1);
  }
}
