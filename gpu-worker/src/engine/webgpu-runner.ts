/**
 * The WebGPU backend (`--device webgpu`): ONNX Runtime's WebGPU execution provider (Dawn; Vulkan on Linux) with the
 * weights and the paged KV cache resident on the device. Per step the host uploads the step's inputs (token ids,
 * positions, slots, masks, sampling parameters) and downloads what the sampler needs, and nothing that grows with
 * the pool: `lastStepTransfer` counts those bytes.
 *
 * @module
 */
import * as ort from "onnxruntime-node";
import type { CompiledModel } from "../model/compiled-model.ts";
import type { LlamaConfig } from "../model/config.ts";
import { deviceKvCache } from "../model/device-kv-cache.ts";
import { buildLlamaGraph, type LinearWeight, type PackedWeights } from "../model/llama-graph.ts";
import { DeviceError } from "./device.ts";
import { DeviceKvPool } from "./device-kv-pool.ts";
import { GREEDY_EPS, type SampledToken, type SamplingFailure, type SamplingRow, sampleBatch } from "./sampler.ts";
import { buildStepInputs, type StepSequence } from "./step-inputs.ts";
import type { SamplingParams } from "./types.ts";

/** Bytes one step moved between host and device memory, as the runner handed them over and read them back. */
export interface StepTransfer {
  hostToDevice: number;
  deviceToHost: number;
}

export interface WebGpuRunnerOptions {
  numBlocks: number;
  blockSize: number;
  /** Most sequences in one step. */
  maxNumSeqs: number;
}

export class WebGpuRunner {
  readonly numSlots: number;
  /** Host↔device bytes of the last step (copies of blocks included). */
  lastStepTransfer: StepTransfer = { hostToDevice: 0, deviceToHost: 0 };

  private constructor(
    private readonly session: ort.InferenceSession,
    private readonly pool: DeviceKvPool,
    readonly cfg: LlamaConfig,
    readonly opts: WebGpuRunnerOptions,
  ) {
    this.numSlots = opts.numBlocks * opts.blockSize;
  }

  /** Bytes of KV cache per token (all layers, keys and values). */
  static kvBytesPerToken(cfg: LlamaConfig): number {
    return 2 * cfg.numHiddenLayers * cfg.numKeyValueHeads * cfg.headDim * 4;
  }

  /** @throws DeviceError with a one-line reason when the device cannot be used. */
  static async create(model: CompiledModel, cfg: LlamaConfig, opts: WebGpuRunnerOptions): Promise<WebGpuRunner> {
    // Every op of the graph has a WebGPU kernel; ONNX Runtime still puts the small shape computations (Shape,
    // Slice, Concat of int64 shapes) on the CPU, which reads tensor metadata only.
    const sessionOptions: ort.InferenceSession.SessionOptions = {
      executionProviders: ["webgpu"],
      graphOptimizationLevel: "all",
      logSeverityLevel: 3,
      extra: {
        session: {
          model_external_initializers_file_folder_path: model.weightsDir,
        },
      },
    };
    try {
      const pool = await DeviceKvPool.create(
        cfg,
        opts.numBlocks * opts.blockSize,
        largestTensorBytes(model.weights),
        sessionOptions,
      );
      const graph = buildLlamaGraph(cfg, model.weights, { kvCache: deviceKvCache(), fusedMatMul: false });
      const session = await ort.InferenceSession.create(graph, sessionOptions);
      return new WebGpuRunner(session, pool, cfg, opts);
    } catch (e) {
      throw asDeviceError(e);
    }
  }

  async copyBlocks(copies: readonly (readonly [number, number])[]): Promise<void> {
    await this.pool.copyBlocks(copies, this.opts.blockSize);
  }

  async step(seqs: readonly StepSequence[], rows: SamplingRow[]): Promise<(SampledToken | SamplingFailure)[]> {
    const inputs = buildStepInputs(seqs, this.opts.blockSize);
    const feeds = inputs.feeds;
    const S = inputs.numRows;
    feeds.new_slots = new ort.Tensor("int64", inputs.newSlots, [inputs.numTokens, 1]);
    const inv = new Float32Array(S).fill(1);
    for (let i = 0; i < S; i++) if (rows[i].params.temperature > 0) inv[i] = 1 / rows[i].params.temperature;
    feeds.inv_temperature = new ort.Tensor("float32", inv, [S]);
    // Rows that only need the greedy token take the device's argmax; any other row needs the logits on the host.
    const hostSampling = rows.some((r) => !isPlainGreedy(r.params));
    const sampling = rows.some((r) => r.params.temperature > 0);
    const fetches: Record<string, ort.Tensor | null> = { ...this.pool.fetches, argmax: null, logits_sum: null };
    if (hostSampling) fetches.logits = null;
    if (hostSampling && sampling) fetches.probs = null;

    let out: ort.InferenceSession.ReturnType;
    try {
      out = await this.session.run({ ...feeds, ...this.pool.feeds }, fetches);
    } catch (e) {
      throw asDeviceError(e);
    }
    for (const name of Object.keys(this.pool.fetches)) out[name].dispose(); // wrappers, not the arrays
    this.lastStepTransfer = {
      hostToDevice: hostBytes(Object.values(feeds)),
      deviceToHost: hostBytes(Object.keys(fetches).flatMap((n) => (n in this.pool.fetches ? [] : [out[n]]))),
    };

    const argmax = out.argmax.data as BigInt64Array;
    const rowSums = out.logits_sum.data as Float32Array;
    if (hostSampling) {
      return sampleBatch(out.logits.data as Float32Array, this.cfg.vocabSize, rows, {
        argmax,
        rowSums,
        probs: sampling ? (out.probs.data as Float32Array) : undefined,
      });
    }
    return rows.map((r, i) => {
      r.rng?.next(); // one draw per sampled token, as on the host path
      if (!Number.isFinite(rowSums[i])) {
        return { tokenId: -1, error: "the model produced non-finite logits (NaN or infinity) for this sequence" };
      }
      return { tokenId: Number(argmax[i]) };
    });
  }
}

/** Bytes of the biggest weight tensor the device must bind whole. */
function largestTensorBytes(w: PackedWeights): number {
  const linear = (lw: LinearWeight) => (lw.kind === "f32" ? lw.weight.length : lw.data.length);
  let n = Math.max(w.embed.weight.length, linear(w.lmHead));
  for (const l of w.layers) n = Math.max(n, linear(l.wqkv), linear(l.wo), linear(l.wgateUp), linear(l.wdown));
  return n;
}

/** Greedy with nothing that edits or reports the logits: the device's argmax is the whole answer. */
function isPlainGreedy(p: SamplingParams): boolean {
  return (
    p.temperature < GREEDY_EPS &&
    !p.logprobs &&
    p.topLogprobs === 0 &&
    Object.keys(p.logitBias).length === 0 &&
    p.repetitionPenalty === 1 &&
    p.presencePenalty === 0 &&
    p.frequencyPenalty === 0
  );
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
