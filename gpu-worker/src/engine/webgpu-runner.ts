/**
 * The WebGPU backend (`--device webgpu`): ONNX Runtime's WebGPU execution provider (Dawn; Vulkan on Linux) with the
 * weights and the paged KV cache resident on the device. Per step the host uploads the step's inputs (token ids,
 * positions, slots, masks, per-row sampling values) and downloads what the sampler needs, and nothing that grows
 * with the pool: `lastStepTransfer` counts those bytes.
 *
 * Sampling happens where the logits are (model/sampling-head.ts, device-sampler.ts): a greedy row downloads its
 * argmax, any other row its best NUM_CANDIDATES tokens. The step's logits stay on the device, written into a
 * [maxNumSeqs, vocab] buffer, and only rows the candidates cannot settle (logit_bias, penalties, a wide nucleus)
 * are gathered to the host afterwards.
 *
 * @module
 */
import * as ort from "onnxruntime-node";
import type { CompiledModel } from "../model/compiled-model.ts";
import type { LlamaConfig } from "../model/config.ts";
import { deviceKvCache } from "../model/device-kv-cache.ts";
import { buildLlamaGraph, type LinearWeight, type PackedWeights } from "../model/llama-graph.ts";
import { DType, GraphBuilder } from "../model/onnx-builder.ts";
import { buildSamplingHead, NO_MIN_P } from "../model/sampling-head.ts";
import { DeviceError } from "./device.ts";
import { DeviceBuffers } from "./device-buffers.ts";
import { DeviceKvPool } from "./device-kv-pool.ts";
import { type DeviceSamplingOutputs, deviceOutputs, isPlainGreedy, sampleFromDevice } from "./device-sampler.ts";
import { type SampledToken, type SamplingFailure, type SamplingRow, sampleBatch } from "./sampler.ts";
import { buildStepInputs, type StepSequence } from "./step-inputs.ts";

/** Bytes one step moved between host and device memory, as the runner handed them over and read them back. */
export interface StepTransfer {
  hostToDevice: number;
  deviceToHost: number;
}

/** What a run leaves for sampling. */
export interface DeviceStep {
  /** S: rows with logits. */
  numRows: number;
  /** [S, vocab], a view of the device logits buffer. */
  logits: ort.Tensor;
  argmax: BigInt64Array;
  rowSums: Float32Array;
}

export interface WebGpuRunnerOptions {
  /** KV pool blocks, or a function called once the weights are loaded. */
  numBlocks: number | (() => number);
  blockSize: number;
  /** Most sequences in one step (rows of the logits buffer). */
  maxNumSeqs: number;
}

/** Largest f32 strictly below 1: a draw must stay below the total mass it scales. */
const MAX_UNIFORM = 1 - 2 ** -24;

export class WebGpuRunner {
  readonly numBlocks: number;
  readonly numSlots: number;
  /** Host↔device bytes of the last step, block copies before it included. */
  lastStepTransfer: StepTransfer = { hostToDevice: 0, deviceToHost: 0 };
  /** The same, summed over every step so far. */
  readonly totalTransfer = { steps: 0, hostToDevice: 0, deviceToHost: 0 };
  private copiedBytes = 0;

  private constructor(
    private readonly session: ort.InferenceSession,
    private readonly pool: DeviceKvPool,
    /** [maxNumSeqs, vocab] on the device: each step's logits, for rows sampled on the host. */
    private readonly logitsBuffer: ort.Tensor,
    /** The sampling head (model/sampling-head.ts), run on the logits buffer in steps where a row samples. */
    private readonly head: ort.InferenceSession,
    private readonly pickRows: ort.InferenceSession,
    private readonly buffers: DeviceBuffers,
    readonly cfg: LlamaConfig,
    readonly opts: WebGpuRunnerOptions,
  ) {
    this.numBlocks = pool.numSlots / opts.blockSize;
    this.numSlots = pool.numSlots;
  }

  /** Bytes of KV cache per token (all layers, keys and values). */
  static kvBytesPerToken(cfg: LlamaConfig): number {
    return 2 * cfg.numHiddenLayers * cfg.numKeyValueHeads * cfg.headDim * 4;
  }

  /**
   * Whether the adapter multiplies in f16 (WebGPU's shader-f16 feature): an f16 MatMul with the CPU fallback
   * disabled, checked against its known result. False when there is no usable adapter at all (create() says why).
   */
  static async supportsF16(): Promise<boolean> {
    const g = new GraphBuilder();
    const x = g.input("x", DType.float, [1, 4]);
    const w = g.op("Cast", [g.op("Expand", [g.float(0.5), g.ints([4, 4])])], { to: DType.float16 });
    g.op("Cast", [g.op("MatMul", [g.op("Cast", [x], { to: DType.float16 }), w])], { to: DType.float }, "y");
    g.output("y", DType.float, [1, 4]);
    try {
      const probe = await ort.InferenceSession.create(g.build("f16_probe"), {
        executionProviders: ["webgpu"],
        logSeverityLevel: 4,
        graphOptimizationLevel: "disabled", // keep the f16 MatMul a device op, not a folded constant
        extra: { session: { disable_cpu_ep_fallback: "1" } },
      });
      const out = await probe.run({ x: new ort.Tensor("float32", Float32Array.from([1, 2, 3, 4]), [1, 4]) });
      await probe.release();
      return (out.y.data as Float32Array).every((v) => v === 5);
    } catch {
      return false;
    }
  }

  /** @throws DeviceError with a one-line reason when the device cannot be used. */
  static async create(model: CompiledModel, cfg: LlamaConfig, opts: WebGpuRunnerOptions): Promise<WebGpuRunner> {
    // Every op of the graph has a WebGPU kernel; ONNX Runtime still puts the small shape computations (Shape,
    // Slice, Concat of int64 shapes) on the CPU, which reads tensor metadata only.
    const sessionOptions: ort.InferenceSession.SessionOptions = {
      executionProviders: ["webgpu"],
      graphOptimizationLevel: "all",
      logSeverityLevel: 3,
      extra: { session: { model_external_initializers_file_folder_path: model.weightsDir } },
    };
    try {
      const buffers = await DeviceBuffers.create(sessionOptions);
      const weightBytes = largestTensorBytes(model.weights);
      const probe = await buffers.zeros(Math.ceil(weightBytes / 4 / cfg.hiddenSize), cfg.hiddenSize);
      await buffers.expectAddressable(probe, "the largest weight tensor", "use --quantization int8 or int4");
      probe.dispose();
      const numBlocks = typeof opts.numBlocks === "number" ? opts.numBlocks : opts.numBlocks();
      const pool = await DeviceKvPool.create(cfg, numBlocks * opts.blockSize, buffers, sessionOptions);
      const logitsBuffer = await buffers.zeros(opts.maxNumSeqs, cfg.vocabSize);
      await buffers.expectAddressable(logitsBuffer, "the logits of --max-num-seqs rows", "lower --max-num-seqs");
      const graph = buildLlamaGraph(cfg, model.weights, { kvCache: deviceKvCache(), fusedMatMul: false, probs: false });
      const session = await ort.InferenceSession.create(graph, sessionOptions);
      const head = await ort.InferenceSession.create(buildSamplingHead(cfg.vocabSize), sessionOptions);
      const pickRows = await ort.InferenceSession.create(pickRowsGraph(cfg.vocabSize), sessionOptions);
      return new WebGpuRunner(session, pool, logitsBuffer, head, pickRows, buffers, cfg, opts);
    } catch (e) {
      throw asDeviceError(e);
    }
  }

  async copyBlocks(copies: readonly (readonly [number, number])[]): Promise<void> {
    this.copiedBytes += await this.pool.copyBlocks(copies, this.opts.blockSize);
  }

  /** Run the model: its logits stay in the device buffer; the argmax and row sums come back. */
  async run(seqs: readonly StepSequence[]): Promise<DeviceStep> {
    const inputs = buildStepInputs(seqs, this.opts.blockSize, { padEmptyGroups: true });
    const S = inputs.numRows;
    const feeds = inputs.feeds;
    feeds.new_slots = new ort.Tensor("int64", inputs.newSlots, [inputs.numTokens, 1]);
    const logits = ort.Tensor.fromGpuBuffer(this.logitsBuffer.gpuBuffer, {
      dataType: "float32",
      dims: [S, this.cfg.vocabSize],
    });
    const fetches: Record<string, ort.Tensor | null> = { ...this.pool.fetches, argmax: null, logits_sum: null };
    if (S > 0) fetches.logits = logits; // (a step of prefill chunks alone has no row)
    let out: ort.InferenceSession.ReturnType;
    try {
      out = await this.session.run({ ...feeds, ...this.pool.feeds }, fetches);
    } catch (e) {
      throw asDeviceError(e);
    }
    for (const name of Object.keys(fetches)) if (fetches[name] !== null) out[name].dispose(); // our buffers' wrappers
    this.lastStepTransfer = { hostToDevice: 0, deviceToHost: 0 };
    this.totalTransfer.steps++;
    this.count(this.copiedBytes + hostBytes(Object.values(feeds)), hostBytes([out.argmax, out.logits_sum]));
    this.copiedBytes = 0;
    return {
      numRows: S,
      logits,
      argmax: out.argmax.data as BigInt64Array,
      rowSums: out.logits_sum.data as Float32Array,
    };
  }

  /**
   * Sample every row: greedy rows take the argmax; any other runs the sampling head on the device buffer and is
   * finished here from its candidates; rows those cannot settle get their logits gathered and sampled on the host.
   */
  async sample(ran: DeviceStep, rows: SamplingRow[]): Promise<(SampledToken | SamplingFailure)[]> {
    const { numRows: S, logits, argmax, rowSums } = ran;
    const V = this.cfg.vocabSize;
    // Each row's one uniform draw: the device draws with it and a host fallback reuses it.
    const draws = rows.map((r) => (r.rng === null ? Math.random() : r.rng.next()));
    let device: DeviceSamplingOutputs | null = null;
    if (S > 0 && !rows.every(isPlainGreedy)) {
      const inv = new Float32Array(S).fill(1);
      const minPOffset = new Float32Array(S).fill(NO_MIN_P);
      rows.forEach(({ params: p }, i) => {
        if (p.temperature > 0) inv[i] = 1 / p.temperature;
        if (p.minP > 0 && p.temperature > 0) minPOffset[i] = p.temperature * Math.log(p.minP);
      });
      const feeds = {
        inv_temperature: new ort.Tensor("float32", inv, [S]),
        uniform: new ort.Tensor(
          "float32",
          Float32Array.from(draws, (u) => Math.min(u, MAX_UNIFORM)),
          [S],
        ),
        min_p_offset: new ort.Tensor("float32", minPOffset, [S]),
      };
      let head: ort.InferenceSession.ReturnType;
      try {
        head = await this.head.run({ ...feeds, logits });
      } catch (e) {
        throw asDeviceError(e);
      }
      this.count(hostBytes(Object.values(feeds)), hostBytes(Object.values(head)));
      device = deviceOutputs(head, argmax, V);
    }
    const tokens: (SampledToken | SamplingFailure | null)[] = rows.map((r, i) => {
      if (!Number.isFinite(rowSums[i])) {
        return { tokenId: -1, error: "the model produced non-finite logits (NaN or infinity) for this sequence" };
      }
      return device === null ? { tokenId: Number(argmax[i]) } : sampleFromDevice(r, draws[i], device, i);
    });

    // Rows only the full logits can settle: fetch just those rows and sample them as the CPU backend would.
    const onHost = tokens.flatMap((t, i) => (t === null ? [i] : []));
    if (onHost.length > 0) {
      const picked = await this.pickRows.run({
        logits,
        rows: new ort.Tensor("int64", BigInt64Array.from(onHost, BigInt), [onHost.length]),
      });
      this.count(onHost.length * 8, hostBytes([picked.picked]));
      const sampled = sampleBatch(
        picked.picked.data as Float32Array,
        V,
        onHost.map((i) => ({ ...rows[i], u: draws[i] })),
      );
      onHost.forEach((i, j) => {
        tokens[i] = sampled[j];
      });
    }
    return tokens as (SampledToken | SamplingFailure)[];
  }

  /** Bytes moved for the current step (run() starts it), into the step's and the running totals. */
  private count(up: number, down: number): void {
    this.lastStepTransfer.hostToDevice += up;
    this.lastStepTransfer.deviceToHost += down;
    this.totalTransfer.hostToDevice += up;
    this.totalTransfer.deviceToHost += down;
  }

  async release(): Promise<void> {
    await this.session.release();
    await this.head.release();
    await this.pickRows.release();
    await this.pool.release();
    this.logitsBuffer.dispose();
    await this.buffers.release();
  }
}

/** picked [R, vocab] = logits[rows]: the rows the host samples itself. */
function pickRowsGraph(vocabSize: number): Uint8Array {
  const g = new GraphBuilder();
  const logits = g.input("logits", DType.float, ["S", vocabSize]);
  g.op("Gather", [logits, g.input("rows", DType.int64, ["R"])], { axis: 0 }, "picked");
  g.output("picked", DType.float, ["R", vocabSize]);
  return g.build("pick_rows");
}

/** Bytes of the biggest weight tensor the device must bind whole. */
function largestTensorBytes(w: PackedWeights): number {
  const linear = (lw: LinearWeight) => (lw.kind === "nbits" ? lw.data.length : lw.weight.length);
  let n = Math.max(w.embed.weight.length, linear(w.lmHead));
  for (const l of w.layers) n = Math.max(n, linear(l.wqkv), linear(l.wo), linear(l.wgateUp), linear(l.wdown));
  return n;
}

function hostBytes(tensors: readonly ort.Tensor[]): number {
  let n = 0;
  for (const t of tensors) if (t.location === "cpu") n += (t.data as ArrayBufferView).byteLength;
  return n;
}

/** ONNX Runtime's and Dawn's failures as one line saying what is wrong with the device. */
function asDeviceError(e: unknown): Error {
  if (e instanceof DeviceError) return e;
  const message = e instanceof Error ? e.message : String(e);
  const detail = message.split("\n")[0].replace(/^.*?(was false\.|\] )\s*/, "");
  if (/Failed to get a WebGPU adapter|No supported adapters|RequestAdapter/i.test(message)) {
    return new DeviceError(
      `webgpu: no usable GPU adapter (${detail}). Install a Vulkan driver: on NVIDIA the driver's Vulkan ICD ` +
        "(containers: NVIDIA_DRIVER_CAPABILITIES must include graphics); without a GPU, Mesa's lavapipe from " +
        "bookworm-backports (mesa-vulkan-drivers 25)",
    );
  }
  if (/device (was )?lost|DeviceLost/i.test(message)) return new DeviceError(`webgpu: the device was lost (${detail})`);
  if (/out of memory|OutOfMemory|OOM/i.test(message))
    return new DeviceError(`webgpu: out of device memory (${detail})`);
  return e instanceof Error ? e : new Error(message);
}
