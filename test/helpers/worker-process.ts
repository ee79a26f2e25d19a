/**
 * A `llama-worker serve` child process for tests that kill or signal workers: its JSON log lines are parsed and
 * kept, and `waitForLog` waits for one that matches.
 *
 * @module
 */
import { type ChildProcess, spawn } from "node:child_process";
import { fileURLToPath } from "node:url";

const BIN = fileURLToPath(new URL("../../gpu-worker/bin/llama-worker.js", import.meta.url));

export type LogLine = Record<string, unknown> & { msg?: string; request_id?: string };

export interface WorkerProcess {
  proc: ChildProcess;
  workerId: string;
  logs: LogLine[];
  /** Exit code (null when killed by a signal). */
  exited: Promise<number | null>;
  waitForLog(match: (l: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
  kill(signal?: NodeJS.Signals): void;
}

export async function startWorkerProcess(opts: {
  natsUrl: string;
  pool: string;
  workerId: string;
  args?: string[];
}): Promise<WorkerProcess> {
  const proc = spawn(
    process.execPath,
    [
      BIN,
      "serve",
      "--nats",
      opts.natsUrl,
      "--pool",
      opts.pool,
      "--worker-id",
      opts.workerId,
      "--health-port",
      "0",
      ...(opts.args ?? []),
    ],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, LLAMA_LOG_LEVEL: "debug" } },
  );
  const logs: LogLine[] = [];
  const waiters = new Set<() => void>();
  let partial = "";
  let stderr = "";
  proc.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
    const lines = (partial + chunk).split("\n");
    partial = lines.pop() ?? "";
    for (const line of lines) {
      try {
        logs.push(JSON.parse(line) as LogLine);
      } catch {
        logs.push({ msg: line });
      }
    }
    for (const w of waiters) w();
  });
  proc.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
    stderr += chunk;
  });
  const exited = new Promise<number | null>((resolve) => proc.once("exit", (code) => resolve(code)));
  const wp: WorkerProcess = {
    proc,
    workerId: opts.workerId,
    logs,
    exited,
    kill: (signal = "SIGTERM") => void proc.kill(signal),
    waitForLog(match, timeoutMs = 30_000) {
      return new Promise((resolve, reject) => {
        const check = () => {
          const hit = logs.find(match);
          if (!hit) return;
          cleanup();
          resolve(hit);
        };
        const timer = setTimeout(() => {
          cleanup();
          reject(
            new Error(`${opts.workerId}: no matching log line in ${timeoutMs} ms; stderr: ${stderr.slice(-2000)}`),
          );
        }, timeoutMs);
        const onExit = () => {
          cleanup();
          reject(new Error(`${opts.workerId} exited; stderr: ${stderr.slice(-2000)}`));
        };
        const cleanup = () => {
          clearTimeout(timer);
          waiters.delete(check);
          proc.off("exit", onExit);
        };
        waiters.add(check);
        proc.once("exit", onExit);
        check();
      });
    },
  };
  await wp.waitForLog((l) => l.msg === "ready", 60_000);
  return wp;
}
