import * as ort from "onnxruntime-node";
import type { CompiledModel } from "../model/compiled-model.ts";
import type { LlamaConfig } from "../model/config.ts";

/** One sequence's share of a step: the tokens it computes now and where its KV lives. */
export interface StepSequence {
  /** Tokens computed in this step: a prefill chunk, or the one token appended last step (decode). */
  tokenIds: readonly number[];
  /** Position of tokenIds[0]; equals the number of tokens whose KV is already in the cache. */
  startPos: number;
  /** Physical blocks covering positions [0, startPos + tokenIds.length). */
  blockTable: readonly number[];
  /** Whether to return next-token logits after this chunk (false for a prefill chunk that is not the last). */
  needLogits: boolean;
}

export interface StepOutput {
  /** [rows, vocab] raw next-token logits. */
  logits: Float32Array;
  /** [rows] index of each row's largest logit (lowest index on ties). */
  argmax: BigInt64Array;
  /** [rows, vocab] softmax of logits / temperature, per row; only computed when some row samples. */
  probs: Float32Array | undefined;
  /** [rows] sum of each row's logits: not finite when the row holds a NaN or an infinity. */
  rowSums: Float32Array;
}

export interface ModelRunnerOptions {
  /** KV pool blocks, or a function called once the weights are loaded (to size the pool from what is left). */
  numBlocks: number | (() => number);
  blockSize: number;
  executionProvider?: "cpu" | "cuda";
  /** ONNX Runtime intra-op threads; default: all cores. */
  numThreads?: number;
  /**
   * Let idle intra-op threads spin between operators (default true). One session per process runs a decode
   * step 20–35 % faster spinning (measured: bench model 18.3 vs 22.0 ms); turn it off when several sessions
   * share the cores and would spin against each other.
   */
  allowSpinning?: boolean;
}

/** The requested ONNX Runtime execution provider cannot run here (for example CUDA without its libraries). */
export class ExecutionProviderError extends Error {
  override name = "ExecutionProviderError";
}

/** -1e9 rather than -Infinity: a fully masked (padding) row then softmaxes to finite garbage, never NaN. */
const MASKED = -1e9;

/**
 * Runs the model for one step over a ragged batch and owns the paged KV pool. The pool is one Float32Array per
 * layer, [2 * kvHeads * slots, headDim] (head-major rows, see llama-graph.ts), handed to ONNX Runtime as inputs
 * every step without copying; the step's fresh keys/values come back as a small output and are written into
 * their slots here. Per-layer arrays keep each one far below a typed array's 2^32-element limit (a 32 GiB pool
 * in one array would not even allocate).
 */
export class ModelRunner {
  /** Layer l's keys and values: row (kv * kvHeads + h) * numSlots + slot, headDim floats each. */
  readonly kvLayers: Float32Array[];
  readonly numSlots: number;
  readonly numBlocks: number;
  private readonly kvDim: number;
  private readonly headDim: number;
  private readonly numKvHeads: number;
  private readonly kvTensors: ort.Tensor[];

  private constructor(
    private readonly session: ort.InferenceSession,
    readonly cfg: LlamaConfig,
    readonly opts: ModelRunnerOptions,
  ) {
    this.kvDim = cfg.numKeyValueHeads * cfg.headDim;
    this.headDim = cfg.headDim;
    this.numKvHeads = cfg.numKeyValueHeads;
    this.numBlocks = typeof opts.numBlocks === "number" ? opts.numBlocks : opts.numBlocks();
    this.numSlots = this.numBlocks * opts.blockSize;
    const rows = 2 * cfg.numKeyValueHeads * this.numSlots;
    this.kvLayers = Array.from({ length: cfg.numHiddenLayers }, () => new Float32Array(rows * cfg.headDim));
    this.kvTensors = this.kvLayers.map((a) => new ort.Tensor("float32", a, [rows, cfg.headDim]));
  }

  static async create(model: CompiledModel, cfg: LlamaConfig, opts: ModelRunnerOptions): Promise<ModelRunner> {
    const provider = opts.executionProvider ?? "cpu";
    let session: ort.InferenceSession;
    try {
      session = await ModelRunner.createSession(model, opts);
    } catch (e) {
      const message = e instanceof Error ? e.message : String(e);
      if (provider === "cuda" && /providers_(shared|cuda)|CUDA/i.test(message)) {
        throw new ExecutionProviderError(
          "the CUDA execution provider is not installed in onnxruntime-node (it ships the CPU build). On a GPU host " +
            "with CUDA 12 and cuDNN 9, run: ONNXRUNTIME_NODE_INSTALL=true node node_modules/onnxruntime-node/script/install.js",
        );
      }
      throw e;
    }
    return new ModelRunner(session, cfg, opts);
  }

  private static createSession(model: CompiledModel, opts: ModelRunnerOptions): Promise<ort.InferenceSession> {
    return ort.InferenceSession.create(model.graph, {
      executionProviders: [opts.executionProvider ?? "cpu"],
      graphOptimizationLevel: "all",
      ...(opts.numThreads ? { intraOpNumThreads: opts.numThreads } : {}),
      extra: {
        session: {
          model_external_initializers_file_folder_path: model.weightsDir,
          "intra_op.allow_spinning": opts.allowSpinning === false ? "0" : "1",
        },
      },
    });
  }

  /** Bytes of KV cache per token (all layers, keys and values). */
  static kvBytesPerToken(cfg: LlamaConfig): number {
    return 2 * cfg.numHiddenLayers * cfg.numKeyValueHeads * cfg.headDim * 4;
  }

  /** Copy whole blocks (copy-on-write of a shared partial block) before a step writes into them. */
  copyBlocks(copies: readonly (readonly [number, number])[]): void {
    const perBlock = this.opts.blockSize * this.headDim;
    for (const [src, dst] of copies) {
      // one contiguous run of slots per (layer, key/value, head)
      for (const kv of this.kvLayers) {
        for (let j = 0; j < 2 * this.numKvHeads; j++) {
          const base = j * this.numSlots * this.headDim;
          const from = base + src * perBlock;
          kv.copyWithin(base + dst * perBlock, from, from + perBlock);
        }
      }
    }
  }

  /**
   * Run one step. Returns logits [rows, vocab] for the sequences with needLogits, in input order, and
   * softmax(logits / temperature) with `temperatures[row]` (1 where omitted).
   */
  async execute(seqs: readonly StepSequence[], temperatures?: readonly number[]): Promise<StepOutput> {
    const feeds = this.prepareInputs(seqs);
    const rows = feeds.logits_index.dims[0];
    const inv = new Float32Array(rows).fill(1);
    if (temperatures) for (let i = 0; i < rows; i++) if (temperatures[i] > 0) inv[i] = 1 / temperatures[i];
    feeds.inv_temperature = new ort.Tensor("float32", inv, [rows]);
    // ONNX Runtime runs only what the requested outputs need: an all-greedy step skips the softmax.
    const sampling = temperatures?.some((t) => t > 0) ?? false;
    const fetches = ["logits", "argmax", "logits_sum", "new_kv", ...(sampling ? ["probs"] : [])];
    const out = await this.session.run(feeds, fetches);
    this.writeNewKv(seqs, out.new_kv.data as Float32Array);
    out.new_kv.dispose();
    return {
      logits: out.logits.data as Float32Array,
      argmax: out.argmax.data as BigInt64Array,
      probs: sampling ? (out.probs.data as Float32Array) : undefined,
      rowSums: out.logits_sum.data as Float32Array,
    };
  }

  private slot(blockTable: readonly number[], pos: number): number {
    const bs = this.opts.blockSize;
    const block = blockTable[Math.floor(pos / bs)];
    if (block === undefined) throw new Error(`block table too short for position ${pos}`);
    return block * bs + (pos % bs);
  }

  private prepareInputs(seqs: readonly StepSequence[]): Record<string, ort.Tensor> {
    let T = 0;
    for (const s of seqs) T += s.tokenIds.length;
    const inputIds = new BigInt64Array(T);
    const positions = new BigInt64Array(T);
    const tokenRow: number[] = []; // first token row of each sequence
    let row = 0;
    for (const s of seqs) {
      tokenRow.push(row);
      for (let i = 0; i < s.tokenIds.length; i++) {
        inputIds[row + i] = BigInt(s.tokenIds[i]);
        positions[row + i] = BigInt(s.startPos + i);
      }
      row += s.tokenIds.length;
    }

    const decode: number[] = [];
    const prefill: number[] = [];
    for (const [i, s] of seqs.entries()) (s.tokenIds.length === 1 ? decode : prefill).push(i);
    const outputIndex = new BigInt64Array(T);
    const feeds: Record<string, ort.Tensor> = {};
    let outBase = 0;
    for (const [name, members] of [
      ["decode", decode],
      ["prefill", prefill],
    ] as const) {
      // An empty group has G = 0: its operators run on empty tensors and cost next to nothing.
      const G = members.length;
      let Q = 1;
      let P = 1; // at least one (masked) past slot keeps every tensor non-empty
      for (const i of members) {
        Q = Math.max(Q, seqs[i].tokenIds.length);
        P = Math.max(P, seqs[i].startPos);
      }
      const K = P + Q;
      const queryIndex = new BigInt64Array(G * Q);
      const pastSlots = new BigInt64Array(G * P);
      const mask = new Float32Array(G * Q * K).fill(MASKED);
      members.forEach((i, gi) => {
        const s = seqs[i];
        const n = s.tokenIds.length;
        for (let q = 0; q < n; q++) {
          queryIndex[gi * Q + q] = BigInt(tokenRow[i] + q);
          outputIndex[tokenRow[i] + q] = BigInt(outBase + gi * Q + q);
        }
        for (let p = 0; p < s.startPos; p++) pastSlots[gi * P + p] = BigInt(this.slot(s.blockTable, p));
        // query q sees every cached position and the fresh tokens up to itself (causal)
        for (let q = 0; q < n; q++) {
          const m = (gi * Q + q) * K;
          mask.fill(0, m, m + s.startPos);
          mask.fill(0, m + P, m + P + q + 1);
        }
      });
      outBase += G * Q;
      feeds[`${name}_query_index`] = new ort.Tensor("int64", queryIndex, [G, Q]);
      feeds[`${name}_past_slots`] = new ort.Tensor("int64", pastSlots, [G, P]);
      // the keys a sequence adds this step are its own query tokens
      feeds[`${name}_new_index`] = new ort.Tensor("int64", queryIndex, [G, Q]);
      feeds[`${name}_mask`] = new ort.Tensor("float32", mask, [G, Q, K]);
    }

    const logitRows: bigint[] = [];
    seqs.forEach((s, i) => {
      if (s.needLogits) logitRows.push(BigInt(tokenRow[i] + s.tokenIds.length - 1));
    });
    feeds.input_ids = new ort.Tensor("int64", inputIds, [T]);
    feeds.positions = new ort.Tensor("int64", positions, [T]);
    this.kvTensors.forEach((t, l) => {
      feeds[`kv_cache.${l}`] = t;
    });
    feeds.output_index = new ort.Tensor("int64", outputIndex, [T]);
    feeds.logits_index = new ort.Tensor("int64", BigInt64Array.from(logitRows), [logitRows.length]);
    return feeds;
  }

  private writeNewKv(seqs: readonly StepSequence[], newKv: Float32Array): void {
    const hd = this.headDim;
    const nkv = this.numKvHeads;
    const L = this.cfg.numHiddenLayers;
    let row = 0;
    for (const s of seqs) {
      for (let i = 0; i < s.tokenIds.length; i++, row++) {
        const slot = this.slot(s.blockTable, s.startPos + i);
        for (let j = 0; j < 2 * L; j++) {
          // new_kv [T, 2L, nkv*hd], j = 2l + kv -> layer l's rows ((kv * nkv + h) * slots + slot)
          const layer = this.kvLayers[j >> 1];
          const src = (row * 2 * L + j) * this.kvDim;
          for (let h = 0; h < nkv; h++) {
            const from = src + h * hd;
            layer.set(newKv.subarray(from, from + hd), (((j & 1) * nkv + h) * this.numSlots + slot) * hd);
          }
        }
      }
    }
  }
}
