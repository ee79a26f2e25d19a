/**
 * `npm start` (scripts/start.mjs) as a child process on free ports and a private state directory: its log lines
 * are kept (and written to `logFile`, so that test files other than the one that started it can follow them),
 * and the pids and metrics URLs it prints are parsed.
 *
 * @module
 */
import { type ChildProcess, spawn } from "node:child_process";
import {
  appendFileSync,
  closeSync,
  fstatSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  statSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { freePort } from "../../scripts/ports.mjs";

const START = fileURLToPath(new URL("../../scripts/start.mjs", import.meta.url));

/** What a test needs to reach a running stack (plain data: it crosses vitest's provide/inject). */
export interface LocalStackInfo {
  /** Gateway base URL, without /v1. */
  url: string;
  stateDir: string;
  /** Every line the supervisor printed so far. */
  logFile: string;
  /** The supervisor's pid. */
  pid: number;
  /** nats-server's monitoring port. */
  natsHttpPort: number;
}

export interface LocalStack extends LocalStackInfo {
  proc: ChildProcess;
  /** Resolves with the exit code, or the signal's name. */
  exited: Promise<number | string>;
  stop(signal?: NodeJS.Signals): Promise<number | string>;
}

export interface StackOptions {
  /** Extra `npm start` options (`--workers 2`, ...). */
  args?: string[];
  /** Extra environment (LLAMA_* worker settings, preferred NATS ports...). */
  env?: Record<string, string>;
}

/** Starts the stack and resolves once it prints "llama-edge is up.". */
export async function startLocalStack(opts: StackOptions = {}): Promise<LocalStack> {
  const stack = await spawnLocalStack(opts);
  const up = await Promise.race([
    waitForLog(stack, /llama-edge is up\./, 0, 300_000).then(() => true),
    stack.exited.then(() => false),
  ]);
  if (!up) throw new Error(`npm start exited early:\n${readLog(stack).slice(-3000)}`);
  const log = readLog(stack);
  stack.url = /OpenAI base URL\s+(\S+)\/v1/.exec(log)?.[1] ?? "";
  stack.natsHttpPort = Number(/monitoring http:\/\/127\.0\.0\.1:(\d+)/.exec(log)?.[1]);
  return stack;
}

/** Starts the stack without waiting for it (`url` and `natsHttpPort` stay empty). */
export async function spawnLocalStack(opts: StackOptions = {}): Promise<LocalStack> {
  const stateDir = mkdtempSync(join(tmpdir(), "llama-edge-stack-"));
  const logFile = join(stateDir, "start.log");
  const env = {
    ...process.env,
    // Free ports for ours: a parallel `npm start` may hold the defaults (that case has a test of its own).
    NATS_PORT: String(await freePort()),
    NATS_WS_PORT: String(await freePort()),
    NATS_HTTP_PORT: String(await freePort()),
    ...opts.env,
  };
  const proc = spawn(process.execPath, [START, "--port", "0", "--state-dir", stateDir, ...(opts.args ?? [])], {
    stdio: ["ignore", "pipe", "pipe"],
    env,
  });
  const exited = new Promise<number | string>((resolve) =>
    proc.once("exit", (code, signal) => resolve(code ?? signal ?? "?")),
  );
  const record = (chunk: Buffer) => appendFileSync(logFile, chunk);
  proc.stdout?.on("data", record);
  proc.stderr?.on("data", record);
  return {
    stateDir,
    logFile,
    pid: proc.pid ?? 0,
    url: "",
    natsHttpPort: 0,
    proc,
    exited,
    async stop(signal = "SIGTERM") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const code = await exited;
      rmSync(stateDir, { recursive: true, force: true });
      return code;
    },
  };
}

/** The development API key and the admin secret `npm start` keeps in its state directory. */
export function secrets(stack: Pick<LocalStackInfo, "stateDir">): { key: string; adminSecret: string } {
  const read = (name: string) => readFileSync(join(stack.stateDir, "edge", name), "utf8").trim();
  return { key: read("dev-key"), adminSecret: read("admin-secret") };
}

/** The log from byte `fromOffset` on (workers logging at info make it long: read only what is new). */
export function readLog(stack: Pick<LocalStackInfo, "logFile">, fromOffset = 0): string {
  let fd: number;
  try {
    fd = openSync(stack.logFile, "r");
  } catch {
    return "";
  }
  try {
    const size = fstatSync(fd).size;
    const buf = Buffer.alloc(Math.max(0, size - fromOffset));
    readSync(fd, buf, 0, buf.length, fromOffset);
    return buf.toString("utf8");
  } finally {
    closeSync(fd);
  }
}

/** The log's length in bytes: an offset for `waitForLog` and `readLog`. */
export function logOffset(stack: Pick<LocalStackInfo, "logFile">): number {
  try {
    return statSync(stack.logFile).size;
  } catch {
    return 0;
  }
}

/** Waits for a log line matching `re` that starts at or after byte `fromOffset` (see `logOffset`). */
export async function waitForLog(
  stack: Pick<LocalStackInfo, "logFile">,
  re: RegExp,
  fromOffset = 0,
  timeoutMs = 60_000,
): Promise<RegExpExecArray> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const m = re.exec(readLog(stack, fromOffset));
    if (m) return m;
    if (Date.now() > until) {
      throw new Error(`no log line matching ${re} in ${timeoutMs} ms:\n${readLog(stack, fromOffset).slice(-4000)}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

export type WorkerLogLine = Record<string, unknown> & { msg?: string; request_id?: string };

/** Waits for a worker's JSON log line (workers log to the supervisor's stdout) that `match` accepts. */
export async function waitForWorkerLog(
  stack: Pick<LocalStackInfo, "logFile">,
  match: (line: WorkerLogLine) => boolean,
  fromOffset = 0,
  timeoutMs = 10_000,
): Promise<WorkerLogLine> {
  for (const until = Date.now() + timeoutMs; ; await new Promise((r) => setTimeout(r, 100))) {
    for (const text of readLog(stack, fromOffset).split("\n")) {
      if (!text.startsWith("{")) continue;
      try {
        const line = JSON.parse(text) as WorkerLogLine;
        if (match(line)) return line;
      } catch {
        // a line still being written
      }
    }
    if (Date.now() > until) throw new Error(`no matching worker log line in ${timeoutMs} ms`);
  }
}

/** The NATS URL (TCP) the stack's nats-server listens on. */
export function natsUrl(stack: Pick<LocalStackInfo, "logFile">): string {
  const m = /nats-server: pid \d+, (nats:\/\/\S+)/.exec(readLog(stack));
  if (!m) throw new Error("no nats-server line in the log");
  return m[1]!;
}

/** The latest pid the supervisor printed for `name` ("nats-server", "gateway", "worker default-0"). */
export function pidOf(stack: Pick<LocalStackInfo, "logFile">, name: string): number {
  const all = [...readLog(stack).matchAll(new RegExp(`\\] ${name}: pid (\\d+)`, "g"))];
  const last = all.at(-1);
  if (!last) throw new Error(`no pid for ${name} in the log`);
  return Number(last[1]);
}

/** The latest metrics URL printed for worker `workerId`. */
export function metricsUrl(stack: Pick<LocalStackInfo, "logFile">, workerId: string): string {
  const all = [...readLog(stack).matchAll(new RegExp(`\\] worker ${workerId}: pid \\d+, metrics (\\S+)`, "g"))];
  const last = all.at(-1);
  if (!last) throw new Error(`no metrics URL for ${workerId} in the log`);
  return last[1]!;
}

/** Whether `pid` is a live process (a zombie, dead but not reaped by its new parent, counts as gone). */
export function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // state is the field after the parenthesised command name
    return !/\)\s+[ZX]\s/.test(stat);
  } catch {
    return false;
  }
}

/** Reads one gauge or counter (summed over its label sets) from a Prometheus text page. */
export async function scrape(url: string, name: string): Promise<number> {
  const text = await (await fetch(url)).text();
  let sum = 0;
  let seen = false;
  for (const line of text.split("\n")) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) {
      sum += Number(line.slice(line.lastIndexOf(" ") + 1));
      seen = true;
    }
  }
  if (!seen) throw new Error(`${name} is not in ${url}`);
  return sum;
}
