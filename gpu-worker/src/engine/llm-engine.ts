import { availableParallelism, freemem } from "node:os";
import { compileModel } from "../model/compiled-model.ts";
import { type LlamaConfig, loadLlamaConfig } from "../model/config.ts";
import type { Quantization } from "../model/quantize.ts";
import { LlamaTokenizer } from "../tokenizer/tokenizer.ts";
import { IncrementalDetokenizer } from "./detokenizer.ts";
import { GrammarCache, type GrammarSpec, type SequenceGrammar } from "./grammar.ts";
import { KVCacheManager } from "./kv-cache-manager.ts";
import { ModelRunner, type StepOutput, type StepSequence } from "./model-runner.ts";
import { finishReasonOf, isFinished, Request, RequestStatus } from "./request.ts";
import { type SamplingRow, sampleBatch } from "./sampler.ts";
import { validateSamplingParams } from "./sampling-params.ts";
import { Scheduler } from "./scheduler.ts";
import { SeededRng } from "./seeded-rng.ts";
import { StopStringChecker } from "./stop-checker.ts";
import type { EngineEvent, EngineRequest, EngineStats, TokenLogprob } from "./types.ts";

export interface EngineOptions {
  modelDir: string;
  /** Most sequences in one step. Default 64. */
  maxNumSeqs?: number;
  /** Token budget of one step (decode tokens + prefill chunk). Default 512. */
  maxNumBatchedTokens?: number;
  /** Tokens per KV block. Default 16. */
  blockSize?: number;
  /** KV pool size in bytes. Default: enough for maxNumSeqs full-length sequences, capped at 4 GiB and at half
   * of the free memory. */
  kvCacheBytes?: number;
  /** KV pool size as a fraction of free memory (used when kvCacheBytes is not given). */
  kvCacheFraction?: number;
  /** Default true. */
  enablePrefixCaching?: boolean;
  /** Context length; default and maximum: the model's max_position_embeddings. */
  maxModelLen?: number;
  executionProvider?: "cpu" | "cuda";
  /** Weight format the checkpoint is compiled to; default "none" (f32). */
  quantization?: Quantization;
  /** ONNX Runtime intra-op threads; default every core (its own default picks one core on some VMs). */
  numThreads?: number;
  /** ONNX Runtime thread spinning between operators; default on (see ModelRunnerOptions.allowSpinning). */
  allowSpinning?: boolean;
  onProgress?: (stage: string, done: number, total: number) => void;
}

/** A request the engine refuses up front (the worker maps these to error events, the edge to HTTP 400). */
export class EngineRequestError extends Error {
  override name = "EngineRequestError";
  constructor(
    readonly code: "context_length_exceeded" | "invalid_request" | "duplicate_request_id",
    message: string,
    readonly param: string | null = null,
  ) {
    super(message);
  }
}

/**
 * One sequence failed on its own (non-finite logits, an error while sampling or processing its output). Only that
 * request ends; the worker reports it as an internal error.
 */
export class EngineSequenceError extends Error {
  override name = "EngineSequenceError";
  readonly code = "internal";
}

/**
 * A step failed in a way no single sequence explains (the model run itself). The step's requests end with this;
 * retrying them, here or on another worker, may succeed.
 */
export class EngineStepError extends Error {
  override name = "EngineStepError";
  readonly code = "unavailable";
}

/** Per-request output state: where its events go, and the text pipeline (detokenizer, then stop strings). */
interface OutputState {
  request: Request;
  channel: EventChannel;
  detok: IncrementalDetokenizer;
  stops: StopStringChecker;
  abortRequested: boolean;
  /** The request's grammar matcher (constrained decoding), advanced with every output token. */
  grammar: SequenceGrammar | null;
}

/**
 * The serving engine: continuous batching over a paged KV cache. `submit()` queues a request and returns its
 * event stream; the engine steps by itself while it has work. Each step blocks the JavaScript thread while
 * ONNX Runtime runs, so a server embeds it off its I/O thread (see service/engine-host).
 */
export class LLMEngine {
  private readonly states = new Map<string, OutputState>();
  private arrivals = 0;
  private stepping = false;
  private loopRunning = false;
  private readonly recentTokens: { t: number; n: number }[] = [];
  #grammars: GrammarCache | null = null;

  private constructor(
    readonly cfg: LlamaConfig,
    readonly tokenizer: LlamaTokenizer,
    private readonly runner: ModelRunner,
    readonly kv: KVCacheManager,
    readonly scheduler: Scheduler,
    readonly config: {
      modelName: string;
      maxModelLen: number;
      maxNumSeqs: number;
      blockSize: number;
      numBlocks: number;
    },
  ) {}

  static async create(opts: EngineOptions): Promise<LLMEngine> {
    const cfg = loadLlamaConfig(opts.modelDir);
    const tokenizer = LlamaTokenizer.fromDir(opts.modelDir);
    const maxModelLen = Math.min(opts.maxModelLen ?? cfg.maxPositionEmbeddings, cfg.maxPositionEmbeddings);
    const maxNumSeqs = opts.maxNumSeqs ?? 64;
    const blockSize = opts.blockSize ?? 16;
    const bytesPerBlock = ModelRunner.kvBytesPerToken(cfg) * blockSize;
    const compiled = compileModel(opts.modelDir, cfg, {
      quantization: opts.quantization,
      onProgress: opts.onProgress && ((d, t) => opts.onProgress?.("compile", d, t)),
    });
    // The pool is sized once the weights are in memory, from what is left then.
    const sizePool = (): number => {
      let kvBytes = opts.kvCacheBytes;
      if (kvBytes === undefined) {
        const available = availableMemory();
        kvBytes =
          opts.kvCacheFraction !== undefined
            ? opts.kvCacheFraction * available
            : Math.min(maxNumSeqs * Math.ceil(maxModelLen / blockSize) * bytesPerBlock, 4 * 1024 ** 3, available / 2);
      }
      const n = Math.floor(kvBytes / bytesPerBlock);
      if (n < 1) throw new Error(`KV cache budget of ${kvBytes} bytes holds no block of ${bytesPerBlock} bytes`);
      return n;
    };
    const runner = await ModelRunner.create(compiled, cfg, {
      numBlocks: sizePool,
      blockSize,
      executionProvider: opts.executionProvider,
      numThreads: opts.numThreads ?? availableParallelism(),
      allowSpinning: opts.allowSpinning,
    });
    const numBlocks = runner.numBlocks;
    const kv = new KVCacheManager({ numBlocks, blockSize, enablePrefixCaching: opts.enablePrefixCaching ?? true });
    const scheduler = new Scheduler({ maxNumSeqs, maxNumBatchedTokens: opts.maxNumBatchedTokens ?? 512 }, kv);
    const modelName = opts.modelDir.replace(/\/+$/, "").split("/").pop() ?? "model";
    return new LLMEngine(cfg, tokenizer, runner, kv, scheduler, {
      modelName,
      maxModelLen,
      maxNumSeqs,
      blockSize,
      numBlocks,
    });
  }

  /**
   * Queue a request. Invalid parameters and prompts that can never fit throw at once (EngineRequestError,
   * SamplingParamError); otherwise events arrive on the returned stream until a `final` event.
   */
  submit(req: EngineRequest): AsyncIterable<EngineEvent> {
    if (this.states.has(req.requestId)) {
      throw new EngineRequestError("duplicate_request_id", `request id ${req.requestId} is already running`);
    }
    const params = validateSamplingParams(req.sampling ?? {}, { vocabSize: this.cfg.vocabSize });
    const promptIds = typeof req.prompt === "string" ? this.tokenizer.encode(req.prompt) : [...req.prompt];
    if (promptIds.length === 0) throw new EngineRequestError("invalid_request", "prompt is empty", "prompt");
    for (const id of promptIds) {
      if (!Number.isInteger(id) || id < 0 || id >= this.cfg.vocabSize) {
        throw new EngineRequestError("invalid_request", `prompt token id ${id} is outside the vocabulary`, "prompt");
      }
    }
    const { maxModelLen, numBlocks, blockSize } = this.config;
    if (promptIds.length >= maxModelLen) {
      throw new EngineRequestError(
        "context_length_exceeded",
        `This model's maximum context length is ${maxModelLen} tokens; the prompt has ${promptIds.length} tokens, leaving no room to generate.`,
        "prompt",
      );
    }
    const poolTokens = numBlocks * blockSize;
    if (promptIds.length >= poolTokens) {
      throw new EngineRequestError(
        "context_length_exceeded",
        `the prompt (${promptIds.length} tokens) does not fit this worker's KV cache (${poolTokens} tokens)`,
        "prompt",
      );
    }
    // A request can never outgrow the context or the whole pool (it would preempt itself forever).
    const maxTotal = Math.min(
      maxModelLen,
      poolTokens,
      params.maxTokens === null ? Number.POSITIVE_INFINITY : promptIds.length + params.maxTokens,
    );
    const rng = new SeededRng(params.seed ?? randomSeed());
    const request = new Request(req.requestId, promptIds, params, rng, maxTotal, this.arrivals++);
    const channel = new EventChannel(() => this.abort(req.requestId));
    const st: OutputState = {
      request,
      channel,
      detok: new IncrementalDetokenizer(this.tokenizer, promptIds),
      stops: new StopStringChecker(params.stop),
      abortRequested: false,
      grammar: null,
    };
    this.states.set(req.requestId, st);
    if (req.grammar) this.queueWithGrammar(st, req.grammar);
    else {
      this.scheduler.add(request);
      this.kick();
    }
    return channel;
  }

  /** Compiled grammars of this engine's tokenizer (created on first use). */
  get grammars(): GrammarCache {
    this.#grammars ??= GrammarCache.for(this.tokenizer, this.cfg.vocabSize, this.cfg.eosTokenIds);
    return this.#grammars;
  }

  /** Queues the request once its grammar is compiled (or found in the cache); a bad grammar fails its stream. */
  private queueWithGrammar(st: OutputState, spec: GrammarSpec): void {
    this.grammars.matcher(spec).then(
      (matcher) => {
        if (isFinished(st.request.status)) {
          matcher.dispose(); // aborted while compiling
          return;
        }
        st.grammar = matcher;
        this.scheduler.add(st.request);
        this.kick();
      },
      (err) => this.fail(st, err instanceof Error ? err : new Error(String(err))),
    );
  }

  /** Abort a request (client went away). Its blocks are free before the next step. */
  abort(requestId: string): void {
    const st = this.states.get(requestId);
    if (!st) return;
    st.abortRequested = true;
    if (!this.stepping) this.finish(st, RequestStatus.FINISHED_ABORTED);
  }

  stats(): EngineStats {
    const kv = this.kv.stats();
    const now = performance.now();
    while (this.recentTokens.length > 0 && now - this.recentTokens[0].t > 5000) this.recentTokens.shift();
    const n = this.recentTokens.reduce((a, b) => a + b.n, 0);
    const span = this.recentTokens.length > 0 ? Math.max(1000, now - this.recentTokens[0].t) : 1000;
    return {
      running: this.scheduler.running.length,
      waiting: this.scheduler.waiting.length,
      preempted: this.scheduler.numPreemptions,
      kvBlocksTotal: kv.total,
      kvBlocksUsed: kv.used,
      kvBlocksFree: kv.free,
      kvBlocksCached: kv.cached,
      blockSize: this.config.blockSize,
      prefixCacheHitRate: kv.hitRate,
      tokensPerSecond: (n * 1000) / span,
    };
  }

  /** Hashes of prefix-cached KV blocks, for load reports that steer requests sharing a prefix here. */
  prefixBlockHashes(limit: number): string[] {
    return this.kv.cachedBlockHashes(limit);
  }

  get hasUnfinished(): boolean {
    return this.scheduler.hasUnfinished;
  }

  /** Start the step loop if it is idle. */
  private kick(): void {
    if (this.loopRunning) return;
    this.loopRunning = true;
    setImmediate(() => {
      this.loop().catch((err) => this.failAll(err));
    });
  }

  private async loop(): Promise<void> {
    try {
      while (this.scheduler.hasUnfinished) {
        await this.step();
        // Let submits, aborts and I/O in between steps.
        await new Promise((r) => setImmediate(r));
      }
    } finally {
      this.loopRunning = false;
    }
  }

  /**
   * One iteration: schedule, run the model, sample, stream out. Failures are contained: a sequence whose
   * sampling or output processing fails ends alone with an error; a model run that fails ends the step's
   * sequences with a retriable error. Either way the other requests and the next step carry on.
   */
  async step(): Promise<void> {
    const plan = this.scheduler.schedule();
    if (plan.scheduled.length === 0) return;
    this.stepping = true;
    let out: StepOutput;
    try {
      this.runner.copyBlocks(plan.blockCopies);
      const temperatures: number[] = [];
      const seqs: StepSequence[] = plan.scheduled.map(({ request, numNewTokens, blockTable }) => {
        const start = request.numComputedTokens;
        const tokenIds: number[] = [];
        for (let i = start; i < start + numNewTokens; i++) tokenIds.push(request.tokenAt(i));
        const needLogits = start + numNewTokens === request.numTokens;
        if (needLogits) temperatures.push(request.params.temperature);
        return { tokenIds, startPos: start, blockTable, needLogits };
      });
      out = await this.runner.execute(seqs, temperatures);
    } catch (e) {
      // Not attributable to one sequence: the step's sequences end (their KV may be half written), nothing else.
      const err = new EngineStepError(`the engine step failed: ${e instanceof Error ? e.message : String(e)}`, {
        cause: e,
      });
      for (const { request } of plan.scheduled) {
        const st = this.states.get(request.requestId);
        if (st) this.fail(st, err);
      }
      return;
    } finally {
      this.stepping = false;
    }

    const sampleRows: SamplingRow[] = [];
    const sampled: OutputState[] = [];
    for (const { request, numNewTokens } of plan.scheduled) {
      request.numComputedTokens += numNewTokens;
      this.kv.cacheFullBlocks(request.requestId, request.tokenIds, request.numComputedTokens);
      if (request.numComputedTokens === request.numTokens) {
        const st = this.states.get(request.requestId)!;
        let allowedTokens: Int32Array | undefined;
        try {
          allowedTokens = await st.grammar?.nextTokenBitmask();
        } catch (e) {
          const message = e instanceof Error ? e.message : String(e);
          this.fail(st, new EngineSequenceError(`the grammar failed: ${message}`, { cause: e }));
          continue;
        }
        sampled.push(st);
        sampleRows.push({
          params: request.params,
          rng: request.rng,
          promptTokenIds: request.promptTokenIds,
          outputTokenIds: request.outputTokenIds,
          allowedTokens,
        });
      }
    }
    const tokens = sampleBatch(out.logits, this.cfg.vocabSize, sampleRows, out);
    let generated = 0;
    sampled.forEach((st, i) => {
      if (st.abortRequested) return;
      const t = tokens[i];
      if (t.error !== undefined) {
        this.fail(st, new EngineSequenceError(t.error));
        return;
      }
      try {
        this.appendToken(st, t.tokenId, t.logprob, t.topLogprobs);
      } catch (e) {
        const message = e instanceof Error ? e.message : String(e);
        this.fail(st, new EngineSequenceError(`output processing failed: ${message}`, { cause: e }));
        return;
      }
      generated++;
    });
    if (generated > 0) this.recentTokens.push({ t: performance.now(), n: generated });
    // Aborts that arrived during the step take effect now, before the next one.
    for (const st of [...this.states.values()]) if (st.abortRequested) this.finish(st, RequestStatus.FINISHED_ABORTED);
  }

  private appendToken(
    st: OutputState,
    tokenId: number,
    logprob: number | undefined,
    top: { tokenId: number; logprob: number }[] | undefined,
  ): void {
    const req = st.request;
    const p = req.params;
    req.appendOutput(tokenId);
    if (st.grammar && !st.grammar.accept(tokenId)) {
      throw new Error(`token ${tokenId} was sampled outside the request's grammar`);
    }
    // A completed grammar ends the sequence with its stop token, ignore_eos or not.
    const isStopToken =
      st.grammar?.isTerminated === true ||
      (!p.ignoreEos && this.cfg.eosTokenIds.includes(tokenId)) ||
      p.stopTokenIds.includes(tokenId);
    let text = "";
    let stopString = false;
    if (!isStopToken) {
      // a stop token's own text is never emitted
      const r = st.stops.push(st.detok.push(tokenId));
      text = r.emit;
      stopString = r.stopped;
    }
    let status: RequestStatus | null = isStopToken || stopString ? RequestStatus.FINISHED_STOPPED : null;
    if (status === null && req.numTokens >= req.maxTotalTokens) status = RequestStatus.FINISHED_LENGTH;
    if (status !== null && !stopString) {
      // Ending for any reason but a stop string: release the text held back for a possible stop string or an
      // incomplete character (with stop ["\n\n"], a final "\n" before EOS is real output).
      const r = st.stops.push(st.detok.flush());
      text += r.emit + (r.stopped ? "" : st.stops.flush());
      if (r.stopped) status = RequestStatus.FINISHED_STOPPED;
    }
    const logprobs: TokenLogprob[] | undefined =
      logprob === undefined
        ? undefined
        : [
            {
              tokenId,
              token: this.tokenizer.tokenText(tokenId),
              bytes: this.tokenizer.tokenBytes(tokenId),
              logprob,
              ...(top
                ? {
                    topLogprobs: top.map((t) => ({
                      ...t,
                      token: this.tokenizer.tokenText(t.tokenId),
                      bytes: this.tokenizer.tokenBytes(t.tokenId),
                    })),
                  }
                : {}),
            },
          ];
    st.channel.push({ type: "delta", text, tokenIds: [tokenId], ...(logprobs ? { logprobs } : {}) });
    if (status !== null) this.finish(st, status);
  }

  private finish(st: OutputState, status: RequestStatus): void {
    const req = st.request;
    if (isFinished(req.status)) return;
    this.scheduler.finish(req, status);
    this.states.delete(req.requestId);
    st.grammar?.dispose();
    st.channel.push({
      type: "final",
      finishReason: finishReasonOf(status),
      usage: {
        promptTokens: req.promptTokenIds.length,
        completionTokens: req.outputTokenIds.length,
        cachedTokens: Math.max(0, req.numCachedTokens),
      },
      promptTokenIds: [...req.promptTokenIds],
    });
    st.channel.close();
  }

  /** End one request with an error (its stream throws it); its blocks are freed before the next step. */
  private fail(st: OutputState, err: Error): void {
    if (isFinished(st.request.status)) return;
    this.scheduler.finish(st.request, RequestStatus.FINISHED_ABORTED);
    this.states.delete(st.request.requestId);
    st.grammar?.dispose();
    st.channel.fail(err);
  }

  /** A failure outside any step (a scheduler invariant broke): every request ends, retriably; the engine stays up. */
  private failAll(err: unknown): void {
    const cause = err instanceof Error ? err : new Error(String(err));
    const stepErr = new EngineStepError(`the engine failed: ${cause.message}`, { cause });
    for (const st of [...this.states.values()]) this.fail(st, stepErr);
  }
}

/**
 * Bytes this process could still allocate: the host's available memory, bounded by the container's memory limit
 * (cgroup) when there is one, since a pod sees the whole node's free memory.
 */
export function availableMemory(): number {
  const limit = process.constrainedMemory?.() ?? 0;
  const free = freemem();
  return limit > 0 ? Math.min(free, Math.max(0, limit - process.memoryUsage.rss())) : free;
}

function randomSeed(): number {
  return Math.floor(Math.random() * 2 ** 32);
}

/**
 * A single-consumer async queue of events. Breaking out of the `for await` loop (return) aborts the request,
 * which is how a disconnected client frees its sequence.
 */
class EventChannel implements AsyncIterable<EngineEvent> {
  private readonly buffer: EngineEvent[] = [];
  private waiter: ((r: IteratorResult<EngineEvent>) => void) | null = null;
  private rejecter: ((e: Error) => void) | null = null;
  private closed = false;
  private error: Error | null = null;

  constructor(private readonly onReturn: () => void) {}

  push(e: EngineEvent): void {
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      this.rejecter = null;
      w({ value: e, done: false });
    } else this.buffer.push(e);
  }

  close(): void {
    this.closed = true;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w({ value: undefined, done: true });
    }
  }

  fail(e: Error): void {
    this.error = e;
    this.closed = true;
    if (this.rejecter) this.rejecter(e);
    this.waiter = null;
    this.rejecter = null;
  }

  [Symbol.asyncIterator](): AsyncIterator<EngineEvent> {
    return {
      next: () => {
        const e = this.buffer.shift();
        if (e) return Promise.resolve({ value: e, done: false });
        if (this.error) return Promise.reject(this.error);
        if (this.closed) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => {
          this.waiter = resolve;
          this.rejecter = reject;
        });
      },
      return: () => {
        if (!this.closed) this.onReturn();
        this.closed = true;
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }
}
