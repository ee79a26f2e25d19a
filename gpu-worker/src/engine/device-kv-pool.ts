/**
 * The paged KV pool in device memory for the WebGPU backend: one key and one value array per layer, each
 * [slots, kvHeads * headDim], allocated once (see device-buffers.ts), and updated in place by the model's
 * ScatterND (see model/device-kv-cache.ts) and by block copies here.
 *
 * In-place updates rest on two properties of onnxruntime-node 1.30 (see README, "Devices"): a session created
 * without `preferredOutputLocation` takes a gpu-buffer tensor in `fetches` as the pre-allocated output and writes
 * into it, and WebGPU's ScatterND copies its input to its output only when they are different buffers.
 *
 * @module
 */
import * as ort from "onnxruntime-node";
import type { LlamaConfig } from "../model/config.ts";
import { keyCacheName, valueCacheName } from "../model/device-kv-cache.ts";
import { DType, GraphBuilder } from "../model/onnx-builder.ts";
import type { DeviceBuffers } from "./device-buffers.ts";

export class DeviceKvPool {
  /** Graph input name -> the layer's array. */
  readonly feeds: Record<string, ort.Tensor>;
  /** Graph output name -> the same array, as the pre-allocated output (the in-place write). */
  readonly fetches: Record<string, ort.Tensor>;

  private constructor(
    /** Rows of every array. */
    readonly numSlots: number,
    names: string[],
    private readonly arrays: ort.Tensor[],
    private readonly copySession: ort.InferenceSession,
  ) {
    this.feeds = Object.fromEntries(names.map((n, i) => [n, arrays[i]]));
    this.fetches = Object.fromEntries(names.map((n, i) => [`${n}_out`, arrays[i]]));
  }

  /** Allocate 2 * layers zero arrays of `numSlots` rows and check that the device addresses a whole one. */
  static async create(
    cfg: LlamaConfig,
    numSlots: number,
    buffers: DeviceBuffers,
    sessionOptions: ort.InferenceSession.SessionOptions,
  ): Promise<DeviceKvPool> {
    const kvDim = cfg.numKeyValueHeads * cfg.headDim;
    const names: string[] = [];
    for (let l = 0; l < cfg.numHiddenLayers; l++) names.push(keyCacheName(l), valueCacheName(l));
    const arrays: ort.Tensor[] = [];
    for (const _ of names) arrays.push(await buffers.zeros(numSlots, kvDim));
    await buffers.expectAddressable(arrays[0], "a KV array (one layer's keys)", "lower --kv-cache-bytes");
    const copy = await ort.InferenceSession.create(copyGraph(names, kvDim), sessionOptions);
    return new DeviceKvPool(numSlots, names, arrays, copy);
  }

  /** Copy whole blocks on the device (copy-on-write of a shared partial block). Returns the bytes uploaded. */
  async copyBlocks(copies: readonly (readonly [number, number])[], blockSize: number): Promise<number> {
    if (copies.length === 0) return 0;
    const src = new BigInt64Array(copies.length * blockSize);
    const dst = new BigInt64Array(copies.length * blockSize);
    copies.forEach(([s, d], c) => {
      for (let i = 0; i < blockSize; i++) {
        src[c * blockSize + i] = BigInt(s * blockSize + i);
        dst[c * blockSize + i] = BigInt(d * blockSize + i);
      }
    });
    const out = await this.copySession.run(
      {
        ...this.feeds,
        src_slots: new ort.Tensor("int64", src, [src.length]),
        dst_slots: new ort.Tensor("int64", dst, [dst.length, 1]),
      },
      this.fetches,
    );
    for (const t of Object.values(out)) t.dispose(); // the wrappers ORT returned, not the buffers
    return src.byteLength + dst.byteLength;
  }

  async release(): Promise<void> {
    for (const a of this.arrays) a.dispose();
    await this.copySession.release();
  }
}

/** For every array: out = ScatterND(array, dst_slots, Gather(array, src_slots)), bound in place by the caller. */
function copyGraph(names: string[], kvDim: number): Uint8Array {
  const g = new GraphBuilder();
  const src = g.input("src_slots", DType.int64, ["C"]);
  const dst = g.input("dst_slots", DType.int64, ["C", 1]);
  for (const name of names) {
    const a = g.input(name, DType.float, ["slots", kvDim]);
    g.op("ScatterND", [a, dst, g.op("Gather", [a, src], { axis: 0 })], {}, `${name}_out`);
    g.output(`${name}_out`, DType.float, ["slots", kvDim]);
  }
  return g.build("kv_copy");
}
