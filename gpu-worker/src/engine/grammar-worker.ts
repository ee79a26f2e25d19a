/**
 * The engine's handle on the grammar thread (grammar-thread.ts), where XGrammar compiles grammars and runs every
 * constrained sequence's matcher. One thread per vocabulary and process, started on first use.
 *
 * NOTE on the step protocol. After sampling, the engine sends the tokens its constrained sequences accepted
 * (`advance`); the thread advances their matchers and computes their next bitmasks while the engine thread runs the
 * next model step, which blocks it. Before sampling, the engine awaits those masks (`masks`): usually they are
 * ready. A matcher only changes when its sequence accepts a token, so a sequence that was not sampled (waiting,
 * preempted, prefilling) keeps its last mask. A stop token ends a grammar, so the engine knows a matcher terminated
 * without asking.
 *
 * @module
 */
import { Worker } from "node:worker_threads";
import { GrammarError, type GrammarSpec, type GrammarVocabulary, vocabularyKey } from "./grammar.ts";

export type ToGrammarThread =
  | { type: "open"; call: number; id: number; spec: GrammarSpec }
  | { type: "advance"; step: number; accepts: [id: number, token: number][] }
  | { type: "close"; id: number }
  | { type: "compile"; call: number; spec: GrammarSpec; warmUpOnly?: boolean };

interface ThreadError {
  name: string;
  message: string;
}

export type FromGrammarThread =
  | { type: "opened"; call: number; mask?: ArrayBuffer; error?: ThreadError }
  | { type: "masks"; step: number; ids: number[]; masks: ArrayBuffer; failed: [id: number, reason: string][] }
  | { type: "compiled"; call: number; ms?: number; hits?: number; misses?: number; error?: ThreadError };

/** Rebuilds an error from the thread: a GrammarError stays one (the request's fault, a 400). */
function fromThread(e: ThreadError): Error {
  if (e.name === "GrammarError") return new GrammarError(e.message);
  const err = new Error(`grammar thread: ${e.message}`);
  err.name = e.name;
  return err;
}

export class GrammarWorker {
  static readonly #byVocabulary = new Map<string, GrammarWorker>();

  readonly #vocab: GrammarVocabulary;
  readonly #words: number;
  #worker: Worker | null = null;
  #nextId = 1;
  #nextCall = 1;
  #step = 0;
  readonly #calls = new Map<number, { resolve: (m: FromGrammarThread) => void; reject: (e: Error) => void }>();
  /** Each open matcher's latest mask. */
  readonly #masks = new Map<number, Int32Array>();
  /** Matchers whose last token the thread refused (never under a correct mask), with why. */
  readonly #failed = new Map<number, string>();
  /** Advances sent and not answered yet, oldest first. */
  #pending: { step: number; done: Promise<void>; resolve: () => void }[] = [];
  /** Compilations served from the thread's cache, and compiled anew (as of the last compile call). */
  hits = 0;
  misses = 0;

  private constructor(vocab: GrammarVocabulary) {
    this.#vocab = vocab;
    this.#words = Math.ceil(vocab.vocabSize / 32);
  }

  /** The process's grammar thread for this vocabulary. */
  static for(vocab: GrammarVocabulary): GrammarWorker {
    const key = vocabularyKey(vocab);
    let w = GrammarWorker.#byVocabulary.get(key);
    if (!w) {
      w = new GrammarWorker(vocab);
      GrammarWorker.#byVocabulary.set(key, w);
    }
    return w;
  }

  get stopTokenIds(): readonly number[] {
    return this.#vocab.stopTokenIds;
  }

  #thread(): Worker {
    if (this.#worker) return this.#worker;
    const worker = new Worker(new URL("./grammar-thread-entry.mjs", import.meta.url), {
      workerData: this.#vocab,
      name: "grammar",
    });
    worker.on("message", (m: FromGrammarThread) => this.#onMessage(m));
    const crash = (e: Error) => {
      if (this.#worker !== worker) return;
      this.#worker = null;
      const err = new Error(`the grammar thread failed: ${e.message}`);
      for (const c of this.#calls.values()) c.reject(err);
      this.#calls.clear();
      for (const id of this.#masks.keys()) this.#failed.set(id, err.message);
      for (const p of this.#pending.splice(0)) p.resolve();
    };
    worker.on("error", crash);
    worker.on("exit", (code) => crash(new Error(`exited with code ${code}`)));
    this.#worker = worker;
    this.#refWhileBusy();
    return worker;
  }

  #post(m: ToGrammarThread): void {
    this.#thread().postMessage(m);
    this.#refWhileBusy();
  }

  /** The thread keeps the process alive only while an answer is awaited (an idle engine must not). */
  #refWhileBusy(): void {
    if (this.#calls.size > 0 || this.#pending.length > 0) this.#worker?.ref();
    else this.#worker?.unref();
  }

  #call(make: (call: number) => ToGrammarThread): Promise<FromGrammarThread> {
    const call = this.#nextCall++;
    return new Promise((resolve, reject) => {
      this.#calls.set(call, { resolve, reject });
      this.#post(make(call));
    });
  }

  #onMessage(m: FromGrammarThread): void {
    if (m.type === "masks") {
      const all = new Int32Array(m.masks);
      m.ids.forEach((id, i) => {
        if (this.#masks.has(id)) this.#masks.set(id, all.subarray(i * this.#words, (i + 1) * this.#words));
      });
      for (const [id, reason] of m.failed) this.#failed.set(id, reason);
      // The thread answers in order: every advance up to this one is done.
      while (this.#pending.length > 0 && this.#pending[0]!.step <= m.step) this.#pending.shift()!.resolve();
      this.#refWhileBusy();
      return;
    }
    const c = this.#calls.get(m.call);
    this.#calls.delete(m.call);
    this.#refWhileBusy();
    if (m.error) c?.reject(fromThread(m.error));
    else c?.resolve(m);
  }

  /** Starts XGrammar in the thread and preprocesses the vocabulary (once). */
  async warmUp(): Promise<void> {
    await this.#call((call) => ({ type: "compile", call, spec: { type: "json_object" }, warmUpOnly: true }));
  }

  /** Compiles `spec` (or finds it in the cache); resolves to the milliseconds it took in the thread. */
  async compile(spec: GrammarSpec): Promise<number> {
    const r = await this.#call((call) => ({ type: "compile", call, spec }));
    if (r.type !== "compiled") throw new Error("unexpected answer from the grammar thread");
    this.hits = r.hits ?? this.hits;
    this.misses = r.misses ?? this.misses;
    return r.ms ?? 0;
  }

  /** A matcher at the start of `spec`'s grammar, with its first mask ready; rejects with GrammarError. */
  async open(spec: GrammarSpec): Promise<number> {
    const id = this.#nextId++;
    const r = await this.#call((call) => ({ type: "open", call, id, spec }));
    if (r.type !== "opened" || !r.mask) throw new Error("unexpected answer from the grammar thread");
    this.#masks.set(id, new Int32Array(r.mask));
    return id;
  }

  close(id: number): void {
    this.#masks.delete(id);
    this.#failed.delete(id);
    if (this.#worker) this.#post({ type: "close", id });
  }

  /** Tells the thread the tokens accepted this step; their next masks are computed meanwhile. */
  advance(accepts: [id: number, token: number][]): void {
    if (accepts.length === 0) return;
    const step = ++this.#step;
    let resolve!: () => void;
    const done = new Promise<void>((r) => {
      resolve = r;
    });
    this.#pending.push({ step, done, resolve });
    this.#post({ type: "advance", step, accepts });
  }

  /** The current masks of `ids` (null: that matcher failed, with why), once the last advance is done. */
  async masks(ids: number[]): Promise<Map<number, Int32Array | { failed: string }>> {
    const last = this.#pending.at(-1);
    if (last) await last.done;
    return new Map(
      ids.map((id) => {
        const failed = this.#failed.get(id);
        const mask = this.#masks.get(id);
        return [id, failed !== undefined || !mask ? { failed: failed ?? "no mask" } : mask];
      }),
    );
  }
}
