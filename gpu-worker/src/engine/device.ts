/**
 * Where the model runs (`--device`), and the error a device that cannot be used fails with. Dependency-free, so the
 * service's main thread can validate flags without loading ONNX Runtime.
 *
 * @module
 */

/** cpu and cuda: ONNX Runtime's CPU and CUDA providers; webgpu: its WebGPU provider (Dawn, Vulkan on Linux). */
export type Device = "cpu" | "cuda" | "webgpu";
export const DEVICES: readonly Device[] = ["cpu", "cuda", "webgpu"];
export const isDevice = (s: string): s is Device => (DEVICES as readonly string[]).includes(s);

/** The device cannot be used: no adapter, lost, out of memory, or too small for the pool. The message is one line. */
export class DeviceError extends Error {
  override name = "DeviceError";
}
