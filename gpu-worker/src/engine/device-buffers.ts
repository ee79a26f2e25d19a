/**
 * f32 matrices that live in device memory for the runner's lifetime (the KV arrays, the logits buffer), made and
 * checked through two tiny ONNX Runtime sessions on the WebGPU provider.
 *
 * onnxruntime-node 1.30 hands a device tensor to JavaScript only as a run's output (`preferredOutputLocation:
 * "gpu-buffer"`), so a buffer is born as the output of a ConstantOfShape. The session that made it owns it and must
 * outlive it.
 *
 * @module
 */
import * as ort from "onnxruntime-node";
import { DType, GraphBuilder } from "../model/onnx-builder.ts";
import { DeviceError } from "./device.ts";

const PROBE_VALUE = 1;

export class DeviceBuffers {
  private constructor(
    private readonly alloc: ort.InferenceSession,
    private readonly probe: ort.InferenceSession,
  ) {}

  static async create(sessionOptions: ort.InferenceSession.SessionOptions): Promise<DeviceBuffers> {
    const alloc = await ort.InferenceSession.create(allocGraph(), {
      ...sessionOptions,
      preferredOutputLocation: "gpu-buffer",
    });
    const probe = await ort.InferenceSession.create(probeGraph(), sessionOptions);
    return new DeviceBuffers(alloc, probe);
  }

  /** A zero-filled [rows, cols] f32 matrix on the device. */
  async zeros(rows: number, cols: number): Promise<ort.Tensor> {
    const shape = new ort.Tensor("int64", BigInt64Array.from([BigInt(rows), BigInt(cols)]), [2]);
    return (await this.alloc.run({ shape })).zeros;
  }

  /**
   * Check that the device addresses all of `matrix` (its last row): past its storage-binding limit a device
   * silently reads 0 and drops writes, which would corrupt generation rather than fail. The last row is left
   * holding PROBE_VALUE (a finite value: callers overwrite or mask it).
   *
   * @throws DeviceError naming `what` and what to do (`remedy`).
   */
  async expectAddressable(matrix: ort.Tensor, what: string, remedy: string): Promise<void> {
    const [rows, cols] = matrix.dims;
    const feeds = {
      matrix,
      row: new ort.Tensor("int64", BigInt64Array.from([BigInt(rows - 1)]), [1, 1]),
      value: new ort.Tensor("float32", new Float32Array(cols).fill(PROBE_VALUE), [1, cols]),
    };
    let read: Float32Array | undefined;
    // write, then read back in a second run (within one run the order of the two is free)
    for (let i = 0; i < 2; i++) {
      const out = await this.probe.run(feeds, { matrix_out: matrix, read: null });
      out.matrix_out.dispose(); // the wrapper ORT returned, not the buffer
      read = out.read.data as Float32Array;
    }
    if (!read?.every((x) => x === PROBE_VALUE)) {
      throw new DeviceError(
        `webgpu: the device cannot address ${what} (${mib(rows * cols * 4)}): it is over the adapter's ` +
          `storage-buffer binding limit (${remedy})`,
      );
    }
  }

  /** Frees the sessions; buffers from `zeros` must be disposed first. */
  async release(): Promise<void> {
    await this.probe.release();
    await this.alloc.release();
  }
}

function mib(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

/** zeros [shape[0], shape[1]], returned on the device. */
function allocGraph(): Uint8Array {
  const g = new GraphBuilder();
  g.op("ConstantOfShape", [g.input("shape", DType.int64, [2])], {}, "zeros");
  g.output("zeros", DType.float, ["rows", "cols"]);
  return g.build("device_alloc");
}

/** Writes `value` at `row` (in place: the caller binds matrix_out to matrix) and returns the row as the run read it. */
function probeGraph(): Uint8Array {
  const g = new GraphBuilder();
  const m = g.input("matrix", DType.float, ["rows", "cols"]);
  const row = g.input("row", DType.int64, [1, 1]);
  g.op("ScatterND", [m, row, g.input("value", DType.float, [1, "cols"])], {}, "matrix_out");
  g.output("matrix_out", DType.float, ["rows", "cols"]);
  g.op("Gather", [m, g.op("Reshape", [row, g.ints([1])])], { axis: 0 }, "read");
  g.output("read", DType.float, [1, "cols"]);
  return g.build("device_probe");
}
