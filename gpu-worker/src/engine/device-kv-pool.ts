/**
 * The paged KV pool in device memory for the WebGPU backend: one key and one value array per layer, each
 * [slots, kvHeads * headDim], allocated once, checked to be addressable, and updated in place by the model's
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
import { DeviceError } from "./device.ts";

const PROBE_VALUE = 1;

export class DeviceKvPool {
  /** Graph input name -> the layer's array. */
  readonly feeds: Record<string, ort.Tensor>;
  /** Graph output name -> the same array, as the pre-allocated output (the in-place write). */
  readonly fetches: Record<string, ort.Tensor>;

  private constructor(
    private readonly names: string[],
    private readonly arrays: ort.Tensor[],
    private readonly copySession: ort.InferenceSession,
    /** Owns the arrays' buffers: it must outlive them. */
    private readonly allocSession: ort.InferenceSession,
  ) {
    this.feeds = Object.fromEntries(names.map((n, i) => [n, arrays[i]]));
    this.fetches = Object.fromEntries(names.map((n, i) => [`${n}_out`, arrays[i]]));
  }

  /**
   * Allocate 2 * layers arrays of `numSlots` rows (zeros) and check that the device addresses a whole array and a
   * buffer of `largestTensorBytes` (the biggest weight): past its storage-binding limit a device silently reads 0
   * and drops writes, which would corrupt generation rather than fail.
   */
  static async create(
    cfg: LlamaConfig,
    numSlots: number,
    largestTensorBytes: number,
    sessionOptions: ort.InferenceSession.SessionOptions,
  ): Promise<DeviceKvPool> {
    const kvDim = cfg.numKeyValueHeads * cfg.headDim;
    const alloc = await ort.InferenceSession.create(allocGraph(kvDim), {
      ...sessionOptions,
      preferredOutputLocation: "gpu-buffer",
    });
    const zeros = async (rows: number) =>
      (await alloc.run({ shape: new ort.Tensor("int64", BigInt64Array.from([BigInt(rows), BigInt(kvDim)]), [2]) }))
        .zeros;
    const probe = await ort.InferenceSession.create(probeGraph(kvDim), sessionOptions);
    const rowBytes = kvDim * 4;
    const arrayBytes = numSlots * rowBytes;
    const names: string[] = [];
    for (let l = 0; l < cfg.numHiddenLayers; l++) names.push(keyCacheName(l), valueCacheName(l));
    const arrays: ort.Tensor[] = [];
    for (const _ of names) arrays.push(await zeros(numSlots));
    await expectAddressable(probe, arrays[0], `a KV array of ${mib(arrayBytes)} (one layer's keys)`);
    if (largestTensorBytes > arrayBytes) {
      const tmp = await zeros(Math.ceil(largestTensorBytes / rowBytes));
      await expectAddressable(probe, tmp, `a weight tensor of ${mib(largestTensorBytes)}`);
      tmp.dispose();
    }
    await probe.release();
    const copy = await ort.InferenceSession.create(copyGraph(names, kvDim), sessionOptions);
    return new DeviceKvPool(names, arrays, copy, alloc);
  }

  /** Copy whole blocks on the device (copy-on-write of a shared partial block). */
  async copyBlocks(copies: readonly (readonly [number, number])[], blockSize: number): Promise<void> {
    if (copies.length === 0) return;
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
  }

  async release(): Promise<void> {
    for (const a of this.arrays) a.dispose();
    await this.copySession.release();
    await this.allocSession.release();
  }

  get numArrays(): number {
    return this.names.length;
  }
}

function mib(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

/** zeros [shape[0], kvDim], returned on the device. */
function allocGraph(kvDim: number): Uint8Array {
  const g = new GraphBuilder();
  g.op("ConstantOfShape", [g.input("shape", DType.int64, [2])], {}, "zeros");
  g.output("zeros", DType.float, ["rows", kvDim]);
  return g.build("kv_alloc");
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

/** Writes `row` at `slot` (in place) and returns the array's row at `slot` as the run found it. */
function probeGraph(kvDim: number): Uint8Array {
  const g = new GraphBuilder();
  const a = g.input("array", DType.float, ["rows", kvDim]);
  const slot = g.input("slot", DType.int64, [1, 1]);
  g.op("ScatterND", [a, slot, g.input("row", DType.float, [1, kvDim])], {}, "array_out");
  g.output("array_out", DType.float, ["rows", kvDim]);
  g.op("Gather", [a, g.op("Reshape", [slot, g.ints([1])])], { axis: 0 }, "read");
  g.output("read", DType.float, [1, kvDim]);
  return g.build("kv_probe");
}

/** Write PROBE_VALUE into the last row, then read it back in a second run (within one run the order is free). */
async function expectAddressable(probe: ort.InferenceSession, array: ort.Tensor, what: string): Promise<void> {
  const [rows, kvDim] = array.dims;
  const feeds = {
    array,
    slot: new ort.Tensor("int64", BigInt64Array.from([BigInt(rows - 1)]), [1, 1]),
    row: new ort.Tensor("float32", new Float32Array(kvDim).fill(PROBE_VALUE), [1, kvDim]),
  };
  let read: Float32Array | undefined;
  for (let i = 0; i < 2; i++) {
    const out = await probe.run(feeds, { array_out: array, read: null });
    out.array_out.dispose();
    read = out.read.data as Float32Array;
  }
  if (!read?.every((x) => x === PROBE_VALUE)) {
    throw new DeviceError(
      `the device cannot address ${what}: it is over the adapter's storage-buffer binding limit (lower --kv-cache-bytes, or use a larger GPU)`,
    );
  }
}
