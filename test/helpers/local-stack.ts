/**
 * `npm start` (scripts/start.mjs) as a child process on free ports and a private state directory: its log lines
 * are kept (and written to `logFile`, so that test files other than the one that started it can follow them),
 * and the pids and metrics URLs it prints are parsed.
 *
 * @module
 */
import { type ChildProcess, spawn } from "node:child_process";
import { appendFileSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
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

export function readLog(stack: Pick<LocalStackInfo, "logFile">): string {
  try {
    return readFileSync(stack.logFile, "utf8");
  } catch {
    return "";
  }
}

/** Waits for a log line matching `re` that starts at or after `fromOffset` (a length of the log seen earlier). */
export async function waitForLog(
  stack: Pick<LocalStackInfo, "logFile">,
  re: RegExp,
  fromOffset = 0,
  timeoutMs = 60_000,
): Promise<RegExpExecArray> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const m = re.exec(readLog(stack).slice(fromOffset));
    if (m) return m;
    if (Date.now() > until) throw new Error(`no log line matching ${re} in ${timeoutMs} ms:\n${readLog(stack)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
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
