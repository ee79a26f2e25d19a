/**
 * What the engine needs from a model backend, and the factory that picks one for `--device`:
 * - cpu, cuda: ModelRunner (model-runner.ts). The KV pool is a host array handed to ONNX Runtime every step; on
 *   CUDA that means the whole pool is copied to the device on every step (see README, "Devices").
 * - webgpu: WebGpuRunner (webgpu-runner.ts). Weights and the KV cache stay on the device; a step moves only its
 *   small inputs and what the sampler needs.
 *
 * As in vLLM's model runners, a backend both runs the model and samples, so a device backend can sample where
 * the logits are.
 *
 * @module
 */
import type { CompiledModel } from "../model/compiled-model.ts";
import type { LlamaConfig } from "../model/config.ts";
import type { Quantization } from "../model/quantize.ts";
import type { Device } from "./device.ts";
import { ModelRunner } from "./model-runner.ts";
import type { SampledToken, SamplingFailure, SamplingRow } from "./sampler.ts";
import type { StepSequence } from "./step-inputs.ts";
import { WebGpuRunner } from "./webgpu-runner.ts";

/**
 * A step is run, then sampled: the engine asks the grammar thread for the step's masks in between, while the
 * backend keeps what the run produced (`Ran`: host logits on the CPU, a device buffer on the GPU).
 */
export interface ModelBackend<Ran = unknown> {
  /** Blocks in the KV pool. */
  readonly numBlocks: number;
  /** Copy whole blocks (copy-on-write of a shared partial block) before a step writes into them. */
  copyBlocks(copies: readonly (readonly [number, number])[]): void | Promise<void>;
  /** Run one step; `temperatures` has one entry per sequence with `needLogits`, in order. A failed run throws. */
  run(seqs: readonly StepSequence[], temperatures: readonly number[]): Promise<Ran>;
  /**
   * Sample the next token of every sequence with `needLogits`: `rows[i]` belongs to the i-th such sequence. A row
   * that cannot be sampled comes back as a SamplingFailure.
   */
  sample(ran: Ran, rows: SamplingRow[]): Promise<(SampledToken | SamplingFailure)[]>;
}

export interface BackendOptions {
  device: Device;
  /** KV pool blocks, or a function called once the weights are loaded (to size the pool from what is left). */
  numBlocks: number | (() => number);
  blockSize: number;
  /** Most sequences in one step (the device backend sizes its logits buffer by it). */
  maxNumSeqs: number;
  /** CPU provider: intra-op threads and spinning (see ModelRunnerOptions). */
  numThreads?: number;
  allowSpinning?: boolean;
}

/** The weight format when none is asked for: f16 on webgpu where the adapter runs shader-f16, else f32. */
export async function defaultWeightFormat(device: Device): Promise<Quantization> {
  return device === "webgpu" && (await WebGpuRunner.supportsF16()) ? "f16" : "none";
}

/** Bytes of KV cache per token (all layers, keys and values) on `device`. */
export function kvBytesPerToken(cfg: LlamaConfig, device: Device): number {
  return device === "webgpu" ? WebGpuRunner.kvBytesPerToken(cfg) : ModelRunner.kvBytesPerToken(cfg);
}

export async function createModelBackend(
  model: CompiledModel,
  cfg: LlamaConfig,
  opts: BackendOptions,
): Promise<ModelBackend> {
  const { numBlocks, blockSize } = opts;
  if (opts.device === "webgpu")
    return WebGpuRunner.create(model, cfg, { numBlocks, blockSize, maxNumSeqs: opts.maxNumSeqs });
  return ModelRunner.create(model, cfg, {
    numBlocks,
    blockSize,
    executionProvider: opts.device,
    numThreads: opts.numThreads,
    allowSpinning: opts.allowSpinning,
  });
}
