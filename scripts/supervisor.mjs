// Keeps the local stack's processes running the way Kubernetes keeps a pod's containers running, and stops them
// all, whatever state they are in.
//
//   const sup = new Supervisor({ log: console.log });
//   sup.add("nats-server", { start: () => spawn(...), ready: (proc) => waitForNats(...), stage: 0 });
//   await sup.ready("nats-server");   // first time up; rejects if it dies before that
//   ...
//   await sup.stop();                 // highest stage first: SIGTERM, SIGKILL after stopTimeoutMs
//
// A process that exits on its own is started again after a back-off: 1 s after a process that had become ready,
// doubling (2, 4 … 30 s) while it keeps dying before it gets there (a bad model, a port taken), as kubelet's
// CrashLoopBackOff does. Every process must be spawned `detached` (its own process group): signals go to the group,
// so a process's own children (workerd under the gateway) stop with it, and a terminal's Ctrl-C reaches only the
// supervisor, which stops things in order.

const BACKOFF_START_MS = 1000;
const BACKOFF_MAX_MS = 30_000;

/** Whether `proc` has exited: by a signal (`signalCode`, with `exitCode` null) or with a code. */
export function hasExited(proc) {
  return proc.exitCode !== null || proc.signalCode !== null;
}

/** Resolves once `proc` has exited, also when that happened before the call ('exit' has then already fired). */
export function exited(proc) {
  if (hasExited(proc) || proc.pid === undefined) return Promise.resolve();
  return new Promise((resolve) => {
    proc.once("exit", () => resolve());
    proc.once("error", () => resolve()); // never started
  });
}

/** Sends `signal` to the process group `proc` leads; ignores groups already gone. */
export function signalGroup(proc, signal) {
  if (proc.pid === undefined) return;
  try {
    process.kill(-proc.pid, signal);
  } catch {
    try {
      proc.kill(signal); // not a group leader after all
    } catch {
      // gone
    }
  }
}

/** How an exit reads in a log line. */
export function describeExit(code, signal) {
  return signal ? `killed by ${signal}` : `exit code ${code}`;
}

/**
 * @typedef {object} ServiceSpec
 * @property {() => import("node:child_process").ChildProcess | Promise<import("node:child_process").ChildProcess>} start
 *   spawns the process (detached)
 * @property {(proc: import("node:child_process").ChildProcess) => Promise<unknown>} [ready]  resolves once it serves
 * @property {number} [stage]  stop order: higher stages stop first (default 0)
 * @property {number} [stopTimeoutMs]  SIGKILL after this long (default 10 s)
 * @property {(proc: import("node:child_process").ChildProcess) => void} [onStart]
 */

export class Supervisor {
  /** @type {Map<string, { spec: ServiceSpec, proc?: import("node:child_process").ChildProcess,
   *   incarnation: number, failures: number, timer?: NodeJS.Timeout, everReady: boolean,
   *   first: { promise: Promise<void>, resolve: () => void, reject: (e: Error) => void } }>} */
  #services = new Map();
  #stopping = false;
  #log;

  /** @param {{ log?: (msg: string) => void }} [opts] */
  constructor(opts = {}) {
    this.#log = opts.log ?? (() => {});
  }

  get stopping() {
    return this.#stopping;
  }

  /** Starts `name` and keeps it running until `stop()`. */
  add(name, /** @type {ServiceSpec} */ spec) {
    if (this.#services.has(name)) throw new Error(`${name} is already supervised`);
    let resolve;
    let reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => {}); // a caller that never asks must not see an unhandled rejection
    const s = { spec, incarnation: 0, failures: 0, everReady: false, first: { promise, resolve, reject } };
    this.#services.set(name, s);
    this.#spawn(name, s);
  }

  /** Resolves the first time `name` is ready; rejects if it exits before that or the supervisor stops first. */
  ready(name) {
    const s = this.#services.get(name);
    if (!s) return Promise.reject(new Error(`${name} is not supervised`));
    return s.first.promise;
  }

  /** The pid of `name`'s current process (undefined between a crash and its restart). */
  pid(name) {
    const p = this.#services.get(name)?.proc;
    return p && !hasExited(p) ? p.pid : undefined;
  }

  async #spawn(name, s) {
    s.timer = undefined;
    if (this.#stopping) return;
    const incarnation = ++s.incarnation;
    let proc;
    try {
      proc = await s.spec.start();
    } catch (e) {
      this.#log(`${name}: could not start: ${e instanceof Error ? e.message : e}`);
      this.#onExit(name, s, null, null, null);
      return;
    }
    if (this.#stopping) {
      signalGroup(proc, "SIGKILL"); // stop() began while it was being spawned
      return;
    }
    s.proc = proc;
    s.spec.onStart?.(proc);
    let gone = false;
    const onGone = (code, signal) => {
      if (gone) return;
      gone = true;
      this.#onExit(name, s, proc, code, signal);
    };
    proc.once("exit", onGone);
    proc.once("error", (e) => {
      if (proc.pid === undefined) {
        this.#log(`${name}: could not start: ${e.message}`);
        onGone(null, null);
      }
    });
    s.spec.ready?.(proc).then(
      () => {
        if (incarnation !== s.incarnation || hasExited(proc) || this.#stopping) return;
        s.failures = 0;
        s.everReady = true;
        s.first.resolve();
      },
      () => {}, // it exited while starting: the exit handler takes it from there
    );
  }

  #onExit(name, s, proc, code, signal) {
    // Its own children (workerd under the gateway) must not outlive it and hold its port.
    if (proc) signalGroup(proc, "SIGKILL");
    if (this.#stopping) return;
    if (!s.everReady) s.first.reject(new Error(`${name} exited before it was ready (${describeExit(code, signal)})`));
    s.failures++;
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** (s.failures - 1));
    this.#log(`${name} exited (${describeExit(code, signal)}); restarting in ${delay / 1000} s`);
    s.timer = setTimeout(() => this.#spawn(name, s), delay);
  }

  /** Stops everything, highest stage first (the stages in parallel inside): SIGTERM, then SIGKILL on timeout. */
  async stop() {
    this.#stopping = true;
    for (const s of this.#services.values()) {
      clearTimeout(s.timer);
      s.first.reject(new Error("stopping"));
    }
    const stages = [...new Set([...this.#services.values()].map((s) => s.spec.stage ?? 0))].sort((a, b) => b - a);
    for (const stage of stages) {
      const members = [...this.#services.values()].filter((s) => (s.spec.stage ?? 0) === stage);
      await Promise.all(members.map((s) => stopProcess(s.proc, s.spec.stopTimeoutMs ?? 10_000)));
    }
  }

  /** SIGKILLs every process group now (a second Ctrl-C, or the supervisor itself failing). */
  killAll() {
    this.#stopping = true;
    for (const s of this.#services.values()) {
      clearTimeout(s.timer);
      s.first.reject(new Error("stopping"));
      if (s.proc) signalGroup(s.proc, "SIGKILL");
    }
  }
}

/** SIGTERM (plus SIGCONT, in case it was stopped), SIGKILL after `timeoutMs`; the group is swept afterwards. */
export async function stopProcess(proc, timeoutMs) {
  if (!proc) return;
  if (!hasExited(proc)) {
    signalGroup(proc, "SIGTERM");
    signalGroup(proc, "SIGCONT");
    const timer = setTimeout(() => signalGroup(proc, "SIGKILL"), timeoutMs);
    await exited(proc);
    clearTimeout(timer);
  }
  signalGroup(proc, "SIGKILL");
}
