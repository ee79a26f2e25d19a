/**
 * Runs the LLMEngine in a `worker_threads` Worker and gives the main thread the same shape of API, async where it
 * has to cross the thread boundary. Why: each engine step blocks its thread while ONNX Runtime runs; on the main
 * thread that would stall NATS pings, heartbeats and cancels for a whole step (or a long prefill).
 *
 * `stats()` stays synchronous: the engine thread pushes a snapshot at a fixed interval and after every finished
 * request, and the host keeps the latest.
 *
 * @example
 * const host = await EngineHost.start({ engineOptions: { modelDir } });
 * for await (const ev of host.submit({ requestId: "r1", prompt: "Once upon a time" })) console.log(ev);
 * await host.close();
 *
 * @module
 */
import { Worker } from "node:worker_threads";
import type { ServedEvent } from "../chat/output-plan.ts";
import type { EngineOptions } from "../engine/llm-engine.ts";
import type { EngineStats } from "../engine/types.ts";
import type {
  EngineConfig,
  EngineStartup,
  HostRequest,
  HostToThread,
  ThreadError,
  ThreadInit,
  ThreadToHost,
} from "./engine-thread-protocol.ts";

export type { ChatPrompt, EngineConfig, EngineStartup, HostRequest } from "./engine-thread-protocol.ts";

export interface EngineHostOptions {
  engineOptions: Omit<EngineOptions, "onProgress">;
  /** How often the engine thread pushes stats. Default 100 ms. */
  statsIntervalMs?: number;
  /** Module exporting `LLMEngine`; default the real engine. */
  engineModule?: string;
  /** Progress of the one-time steps while the engine starts (stage "compile": tensors packed). */
  onProgress?: (stage: string, done: number, total: number) => void;
}

/** The engine refused or failed a request; `name` and `code` are the engine's (EngineRequestError, ...). */
export class EngineRequestFailed extends Error {
  constructor(
    readonly requestId: string,
    readonly error: ThreadError,
  ) {
    super(error.message);
    this.name = "EngineRequestFailed";
  }
}

/** The engine thread died; every request in flight fails with this and the host is unusable. */
export class EngineCrashedError extends Error {
  override name = "EngineCrashedError";
}

export class EngineHost {
  readonly #worker: Worker;
  readonly #streams = new Map<string, EventStream>();
  readonly #hashCalls = new Map<number, (hashes: string[]) => void>();
  readonly #statsListeners = new Set<(s: EngineStats) => void>();
  #nextCallId = 0;
  #stats: EngineStats;
  #crashed: Error | undefined;
  #closing = false;
  /** Resolves when the thread is gone (closed or crashed), with the crash if any. */
  readonly exited: Promise<Error | undefined>;

  private constructor(
    worker: Worker,
    readonly config: EngineConfig,
    stats: EngineStats,
    /** How long the engine took to start, by step. */
    readonly startup: EngineStartup,
  ) {
    this.#worker = worker;
    this.#stats = stats;
    worker.on("message", (m: ThreadToHost) => this.#onMessage(m));
    this.exited = new Promise((resolve) => {
      const crash = (err: Error) => {
        if (this.#crashed) return;
        this.#crashed = err;
        for (const s of this.#streams.values()) s.fail(err);
        this.#streams.clear();
        for (const answer of this.#hashCalls.values()) answer([]);
        this.#hashCalls.clear();
        resolve(err);
      };
      worker.on("error", (e) => crash(new EngineCrashedError(`engine thread failed: ${e.message}`, { cause: e })));
      worker.on("exit", (code) => {
        if (this.#closing) resolve(undefined);
        else crash(new EngineCrashedError(`engine thread exited with code ${code}`));
      });
    });
  }

  /** Starts the engine thread and waits until the model is loaded. Rejects with the engine's error if it can't. */
  static async start(opts: EngineHostOptions): Promise<EngineHost> {
    const init: ThreadInit = {
      engineOptions: opts.engineOptions,
      engineModule: opts.engineModule ?? new URL("../engine/llm-engine.ts", import.meta.url).href,
      statsIntervalMs: opts.statsIntervalMs ?? 100,
    };
    const worker = spawnThread(init);
    const first = await new Promise<ThreadToHost>((resolve, reject) => {
      const onMessage = (m: ThreadToHost) => {
        if (m.type === "progress") return opts.onProgress?.(m.stage, m.done, m.total);
        worker.off("message", onMessage);
        resolve(m);
      };
      worker.on("message", onMessage);
      worker.once("error", reject);
      worker.once("exit", (code) => reject(new EngineCrashedError(`engine thread exited with code ${code} at start`)));
    });
    if (first.type === "ready") return new EngineHost(worker, first.config, first.stats, first.startup);
    await worker.terminate();
    if (first.type === "startFailed") {
      const err = new Error(first.error.message);
      err.name = first.error.name;
      throw err;
    }
    throw new EngineCrashedError(`unexpected first message from the engine thread: ${first.type}`);
  }

  /** Queues a request; its events arrive on the returned stream. Refusals throw EngineRequestFailed from it. */
  submit(request: HostRequest): AsyncIterable<ServedEvent> {
    if (this.#crashed) throw this.#crashed;
    if (this.#streams.has(request.requestId)) {
      throw new EngineRequestFailed(request.requestId, {
        name: "EngineRequestError",
        code: "duplicate_request_id",
        message: `request id ${request.requestId} is already running`,
      });
    }
    const stream = new EventStream(() => this.abort(request.requestId));
    this.#streams.set(request.requestId, stream);
    this.#post({ type: "submit", request });
    return stream;
  }

  /** Aborts a request; the engine frees its blocks before its next step and ends its stream with `abort`. */
  abort(requestId: string): void {
    if (this.#streams.has(requestId)) this.#post({ type: "abort", requestId });
  }

  /** The latest stats snapshot (at most `statsIntervalMs` old). */
  stats(): EngineStats {
    return this.#stats;
  }

  /** Calls `listener` with every new snapshot; returns the unsubscribe function. */
  onStats(listener: (s: EngineStats) => void): () => void {
    this.#statsListeners.add(listener);
    return () => this.#statsListeners.delete(listener);
  }

  /** Hashes of blocks in the prefix cache (most useful first), for load reports. Empty if the engine has none. */
  prefixBlockHashes(limit: number): Promise<string[]> {
    if (this.#crashed) return Promise.resolve([]);
    const callId = this.#nextCallId++;
    return new Promise((resolve) => {
      this.#hashCalls.set(callId, resolve);
      this.#post({ type: "prefixHashes", callId, limit });
    });
  }

  get numRequests(): number {
    return this.#streams.size;
  }

  async close(): Promise<void> {
    this.#closing = true;
    for (const s of this.#streams.values()) s.fail(new EngineCrashedError("engine closed"));
    this.#streams.clear();
    await this.#worker.terminate();
  }

  #post(m: HostToThread): void {
    this.#worker.postMessage(m);
  }

  #onMessage(m: ThreadToHost): void {
    switch (m.type) {
      case "event": {
        const s = this.#streams.get(m.requestId);
        if (!s) return;
        s.push(m.event);
        if (m.event.type === "final") {
          this.#streams.delete(m.requestId);
          s.close();
        }
        return;
      }
      case "failed": {
        const s = this.#streams.get(m.requestId);
        this.#streams.delete(m.requestId);
        s?.fail(new EngineRequestFailed(m.requestId, m.error));
        return;
      }
      case "stats":
        this.#stats = m.stats;
        for (const l of this.#statsListeners) l(m.stats);
        return;
      case "prefixHashes":
        this.#hashCalls.get(m.callId)?.(m.hashes);
        this.#hashCalls.delete(m.callId);
        return;
      default:
        return;
    }
  }
}

function spawnThread(init: ThreadInit): Worker {
  // A .mjs entry that registers tsx first: see its comment.
  return new Worker(new URL("./engine-thread-entry.mjs", import.meta.url), { workerData: init, name: "llm-engine" });
}

/** Events of one request, from the port to a `for await` loop. Leaving the loop early aborts the request. */
class EventStream implements AsyncIterable<ServedEvent> {
  #buffer: ServedEvent[] = [];
  #done = false;
  #error: Error | undefined;
  #wake: (() => void) | undefined;

  constructor(private readonly onEarlyReturn: () => void) {}

  push(e: ServedEvent): void {
    this.#buffer.push(e);
    this.#wake?.();
  }

  close(): void {
    this.#done = true;
    this.#wake?.();
  }

  fail(e: Error): void {
    this.#error = e;
    this.#done = true;
    this.#wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<ServedEvent> {
    let finished = false;
    try {
      for (;;) {
        const e = this.#buffer.shift();
        if (e) {
          yield e;
          continue;
        }
        if (this.#error) throw this.#error;
        if (this.#done) {
          finished = true;
          return;
        }
        await new Promise<void>((resolve) => {
          this.#wake = resolve;
        });
        this.#wake = undefined;
      }
    } finally {
      if (!finished && !this.#error) this.onEarlyReturn();
    }
  }
}
