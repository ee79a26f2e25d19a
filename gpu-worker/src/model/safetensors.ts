/**
 * The safetensors checkpoint format: an 8-byte little-endian header length, a JSON header
 * `{name: {dtype, shape, data_offsets: [begin, end]}, __metadata__?: {...}}`, then the raw tensor bytes.
 * Offsets are relative to the first byte after the header.
 *
 * Everything here works on file descriptors with positioned reads and writes, never on a whole file, because
 * real checkpoints run to tens of gigabytes. The f16/bf16 conversions live here too: they are only needed to
 * move tensors in and out of these files.
 *
 * @module
 */
import { closeSync, existsSync, fstatSync, openSync, readSync, statSync, writeSync } from "node:fs";
import { isAbsolute, join, normalize } from "node:path";
import { readJsonFile } from "./config.ts";
import { ModelLoadError } from "./errors.ts";

export type SafetensorsDtype = "F32" | "F16" | "BF16";

export interface TensorInfo {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  file: string;
  /** absolute byte offset of the data in file */
  dataOffset: number;
  byteLength: number;
}

/** A tensor to write. `data` may be a thunk so a writer holds one tensor in memory at a time, not the model. */
export interface SafetensorsTensor {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  data: Float32Array | (() => Float32Array);
}

const BYTES_PER_ELEMENT: Record<SafetensorsDtype, number> = { F32: 4, F16: 2, BF16: 2 };
const SUPPORTED = Object.keys(BYTES_PER_ELEMENT).join(", ");
/** Tensor names that only pre-quantized checkpoints (GPTQ, AWQ, bitsandbytes, fp8) have. */
export const PRE_QUANTIZED_TENSOR = /\.(qweight|qzeros|g_idx|weight_scale|weight_zero_point|SCB|absmax|quant_map)$/;
export const PRE_QUANTIZED_MESSAGE =
  "pre-quantized (GPTQ/AWQ/bitsandbytes-style) tensors are not supported: serve the F32/F16/BF16 checkpoint " +
  "with --quantization int8 or int4 instead";

/** Dtypes the format defines but we cannot run; named so the error says "unsupported", not "unknown". */
const KNOWN_UNSUPPORTED = new Set([
  "BOOL",
  "U8",
  "I8",
  "U16",
  "I16",
  "U32",
  "I32",
  "U64",
  "I64",
  "F64",
  "F8_E4M3",
  "F8_E5M2",
  "F8_E8M0",
  "F6_E2M3",
  "F6_E3M2",
  "F4",
  "C64",
]);
/** Real headers are a few hundred KB even for 400B-parameter models; anything near this is a corrupt length. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;
/** readSync/writeSync move at most ~2 GiB per call; an f32 Llama 3 embedding table is larger than that. */
const IO_CHUNK_BYTES = 1 << 30;

// Typed-array views below reinterpret file bytes in host order; safetensors is little-endian.
if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1)
  throw new Error("safetensors.ts assumes a little-endian host");

function elementCount(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Header

function openForRead(file: string): number {
  try {
    return openSync(file, "r");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new ModelLoadError(file, code === "ENOENT" ? "file not found" : `cannot open: ${(e as Error).message}`);
  }
}

/** Read exactly `length` bytes at `position` into `into`, looping over short reads. */
function readFully(fd: number, file: string, into: Uint8Array, position: number): void {
  let done = 0;
  while (done < into.length) {
    const n = readSync(fd, into, done, Math.min(into.length - done, IO_CHUNK_BYTES), position + done);
    if (n === 0) throw new ModelLoadError(file, `unexpected end of file at byte ${position + done}`);
    done += n;
  }
}

function parseEntry(file: string, name: string, raw: unknown, dataStart: number, fileSize: number): TensorInfo {
  const bad = (message: string) => new ModelLoadError(file, message, name);
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw bad("header entry is not an object");
  const { dtype, shape, data_offsets: offsets } = raw as Record<string, unknown>;
  if (typeof dtype !== "string") throw bad(`dtype must be a string, got ${JSON.stringify(dtype)}`);
  if (!(dtype in BYTES_PER_ELEMENT)) {
    if (PRE_QUANTIZED_TENSOR.test(name)) throw bad(PRE_QUANTIZED_MESSAGE);
    const kind = KNOWN_UNSUPPORTED.has(dtype) ? "unsupported" : "unknown";
    throw bad(`${kind} dtype "${dtype}": supported dtypes are ${SUPPORTED}`);
  }
  const isDim = (d: unknown): d is number => typeof d === "number" && Number.isSafeInteger(d) && d >= 0;
  if (!Array.isArray(shape) || !shape.every(isDim)) {
    throw bad(`shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isDim) || offsets[0] > offsets[1]) {
    throw bad(`data_offsets must be [begin, end] with 0 <= begin <= end, got ${JSON.stringify(offsets)}`);
  }
  const [begin, end] = offsets as [number, number];
  const dt = dtype as SafetensorsDtype;
  const expected = elementCount(shape) * BYTES_PER_ELEMENT[dt];
  if (end - begin !== expected) {
    throw bad(
      `data_offsets [${begin}, ${end}] span ${end - begin} bytes but shape [${shape.join(", ")}] of ${dt} needs ${expected}`,
    );
  }
  if (dataStart + end > fileSize) {
    throw bad(
      `data ends at byte ${dataStart + end} but the file has only ${fileSize} bytes (truncated download or copy?)`,
    );
  }
  return { name, dtype: dt, shape: [...shape], file, dataOffset: dataStart + begin, byteLength: expected };
}

/**
 * Read and validate the header of one `.safetensors` file without touching its tensor data.
 * Throws a `ModelLoadError` naming the file (and the tensor) for anything a loader could trip over later.
 *
 * @example
 * const infos = readSafetensorsHeader("/models/x/model.safetensors");
 * infos.get("model.norm.weight")?.shape; // [hidden]
 */
export function readSafetensorsHeader(file: string): Map<string, TensorInfo> {
  const fd = openForRead(file);
  try {
    const fileSize = fstatSync(fd).size;
    if (fileSize < 8) throw new ModelLoadError(file, `file is ${fileSize} bytes, too short for a safetensors header`);
    const lenBytes = new Uint8Array(8);
    readFully(fd, file, lenBytes, 0);
    const headerLen = new DataView(lenBytes.buffer).getBigUint64(0, true);
    if (headerLen > BigInt(MAX_HEADER_BYTES)) {
      throw new ModelLoadError(
        file,
        `header length ${headerLen} is absurd (> ${MAX_HEADER_BYTES}): not a safetensors file?`,
      );
    }
    if (headerLen > BigInt(fileSize - 8)) {
      throw new ModelLoadError(
        file,
        `header length ${headerLen} exceeds the file size ${fileSize}: truncated or corrupt`,
      );
    }
    const headerBytes = new Uint8Array(Number(headerLen));
    readFully(fd, file, headerBytes, 8);
    let header: unknown;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBytes));
    } catch (e) {
      throw new ModelLoadError(file, `header is not valid JSON: ${(e as Error).message}`);
    }
    if (typeof header !== "object" || header === null || Array.isArray(header)) {
      throw new ModelLoadError(file, "header is not a JSON object");
    }
    const dataStart = 8 + headerBytes.length;
    const out = new Map<string, TensorInfo>();
    for (const [name, raw] of Object.entries(header)) {
      if (name === "__metadata__") continue;
      out.set(name, parseEntry(file, name, raw, dataStart, fileSize));
    }
    return out;
  } finally {
    closeSync(fd);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Checkpoint directories

/** Shards must sit beside the index; a `../` entry would let a downloaded index read arbitrary files. */
function shardPath(dir: string, indexFile: string, shard: string, tensor: string): string {
  if (isAbsolute(shard) || normalize(shard).startsWith("..")) {
    throw new ModelLoadError(indexFile, `shard path ${JSON.stringify(shard)} leaves the checkpoint directory`, tensor);
  }
  return join(dir, shard);
}

function openSharded(dir: string, indexFile: string): Map<string, TensorInfo> {
  const index = readJsonFile(dir, "model.safetensors.index.json", false) as Record<string, unknown>;
  const weightMap = index.weight_map;
  if (typeof weightMap !== "object" || weightMap === null || Array.isArray(weightMap)) {
    throw new ModelLoadError(indexFile, `"weight_map" must be an object of tensor name -> shard file`);
  }
  const byShard = new Map<string, string[]>();
  for (const [name, shard] of Object.entries(weightMap)) {
    if (typeof shard !== "string") throw new ModelLoadError(indexFile, "weight_map entry is not a file name", name);
    const list = byShard.get(shard) ?? [];
    list.push(name);
    byShard.set(shard, list);
  }
  const out = new Map<string, TensorInfo>();
  for (const [shard, names] of byShard) {
    const path = shardPath(dir, indexFile, shard, names[0]);
    if (!existsSync(path)) {
      throw new ModelLoadError(path, `shard listed in ${indexFile} (for ${names.length} tensors) not found`, names[0]);
    }
    const infos = readSafetensorsHeader(path);
    for (const name of names) {
      const info = infos.get(name);
      if (!info)
        throw new ModelLoadError(path, `${indexFile} places this tensor in this shard, but it is not there`, name);
      out.set(name, info);
    }
  }
  return out;
}

/**
 * All tensors of a Hugging Face checkpoint directory: `model.safetensors`, or the shards named by
 * `model.safetensors.index.json` (each shard is checked to exist and to hold what the index says).
 */
export function openCheckpointTensors(dir: string): Map<string, TensorInfo> {
  let isDir = false;
  try {
    isDir = statSync(dir).isDirectory();
  } catch {
    throw new ModelLoadError(dir, "checkpoint directory not found");
  }
  if (!isDir) throw new ModelLoadError(dir, "not a directory: expected a Hugging Face checkpoint directory");
  const single = join(dir, "model.safetensors");
  if (existsSync(single)) return readSafetensorsHeader(single);
  const indexFile = join(dir, "model.safetensors.index.json");
  if (existsSync(indexFile)) return openSharded(dir, indexFile);
  const hint = ["pytorch_model.bin", "pytorch_model.bin.index.json"].some((f) => existsSync(join(dir, f)))
    ? " (found pytorch_model.bin: convert it to safetensors first)"
    : "";
  throw new ModelLoadError(dir, `no model.safetensors or model.safetensors.index.json in the directory${hint}`);
}

// ---------------------------------------------------------------------------------------------------------------
// Half-precision conversions

let f16Table: Float32Array | null = null;

/** Decode IEEE binary16 bits (subnormals, ±inf and NaN included) exactly to a number. */
export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1024 + mant) * 2 ** (exp - 25);
}

/** All 65536 halves decoded once (256 KB): a table lookup is the fastest exact conversion in JS. */
function f16ToF32Table(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16BitsToF32(h);
  }
  return f16Table;
}

/** IEEE float32 bits -> binary16 bits, round-to-nearest-even; overflow gives ±inf, NaN stays (quiet) NaN. */
export function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 112; // rebias 127 -> 15
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // Result is subnormal (or zero): shift the full 24-bit significand down to units of 2^-24.
    if (e < -10) return sign;
    const full = mant | 0x800000;
    const shift = 14 - e;
    let h = full >>> shift;
    const rem = full & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && h & 1)) h++; // a carry into bit 10 correctly yields the smallest normal
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++; // a carry out of the top exponent correctly yields inf
  return sign | h;
}

/** IEEE float32 bits -> bfloat16 bits, round-to-nearest-even; NaN stays (quiet) NaN. */
export function f32BitsToBf16Bits(x: number): number {
  if ((x & 0x7f800000) === 0x7f800000 && x & 0x7fffff) return ((x >>> 16) | 0x40) & 0xffff;
  return ((x >>> 0) + 0x7fff + ((x >>> 16) & 1)) >>> 16;
}

// ---------------------------------------------------------------------------------------------------------------
// Reading tensor data

/** Raw tensor bytes into a fresh, aligned buffer (positioned reads, so no seek state is shared). */
function readBytes(info: TensorInfo): ArrayBuffer {
  const buf = new ArrayBuffer(info.byteLength);
  const fd = openForRead(info.file);
  try {
    readFully(fd, info.file, new Uint8Array(buf), info.dataOffset);
  } catch (e) {
    if (e instanceof ModelLoadError) throw new ModelLoadError(info.file, e.message, info.name);
    throw e;
  } finally {
    closeSync(fd);
  }
  return buf;
}

/** The tensor as float32, widening F16/BF16 exactly. */
export function readTensorF32(info: TensorInfo): Float32Array {
  if (info.dtype === "F32") return new Float32Array(readBytes(info));
  const src = new Uint16Array(readBytes(info));
  const out = new Float32Array(src.length);
  if (info.dtype === "BF16") {
    // bf16 is the top half of an f32: widen by shifting the bits, no arithmetic.
    const bits = new Uint32Array(out.buffer);
    for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
  } else {
    const table = f16ToF32Table();
    for (let i = 0; i < src.length; i++) out[i] = table[src[i]];
  }
  return out;
}

/** The tensor as IEEE half bits (round-to-nearest-even from F32/BF16), for an f16 device path. */
export function readTensorF16Bits(info: TensorInfo): Uint16Array {
  if (info.dtype === "F16") return new Uint16Array(readBytes(info));
  // Either way, go through the f32 bit pattern: bf16 -> f32 is exact, so only one rounding happens.
  const src = info.dtype === "F32" ? new Uint32Array(readBytes(info)) : new Uint16Array(readBytes(info));
  const shift = info.dtype === "F32" ? 0 : 16;
  const half = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) half[i] = f32BitsToF16Bits((src[i] << shift) >>> 0);
  return half;
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

/** Encode float32 values as the on-disk bytes of `dtype`. */
function encode(data: Float32Array, dtype: SafetensorsDtype): Uint8Array {
  if (dtype === "F32") return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  const out = new Uint16Array(data.length);
  const conv = dtype === "F16" ? f32BitsToF16Bits : f32BitsToBf16Bits;
  for (let i = 0; i < bits.length; i++) out[i] = conv(bits[i]);
  return new Uint8Array(out.buffer);
}

function writeFully(fd: number, bytes: Uint8Array): void {
  let done = 0;
  while (done < bytes.length) {
    done += writeSync(fd, bytes, done, Math.min(bytes.length - done, IO_CHUNK_BYTES));
  }
}

/**
 * Write a safetensors file, converting each tensor's f32 data to its dtype (round-to-nearest-even).
 * Tensors are written one at a time in the given order; pass thunks as `data` to keep only one in memory.
 * Like the reference writer, the header is space-padded to a multiple of 8 bytes so the data is aligned.
 */
export function writeSafetensors(
  file: string,
  tensors: readonly SafetensorsTensor[],
  metadata?: Record<string, string>,
): void {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  for (const t of tensors) {
    if (t.name === "__metadata__" || t.name in header) throw new Error(`writeSafetensors: duplicate name ${t.name}`);
    const bytes = elementCount(t.shape) * BYTES_PER_ELEMENT[t.dtype];
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  const jsonBytes = () => Buffer.byteLength(json, "utf8");
  json += " ".repeat((8 - (jsonBytes() % 8)) % 8);
  const prefix = Buffer.alloc(8 + jsonBytes());
  prefix.writeBigUInt64LE(BigInt(jsonBytes()), 0);
  prefix.write(json, 8, "utf8");

  const fd = openSync(file, "w");
  try {
    writeFully(fd, prefix);
    for (const t of tensors) {
      const data = typeof t.data === "function" ? t.data() : t.data;
      const n = elementCount(t.shape);
      if (data.length !== n) {
        throw new Error(`writeSafetensors: ${t.name} has ${data.length} values but shape [${t.shape}] needs ${n}`);
      }
      writeFully(fd, encode(data, t.dtype));
    }
  } finally {
    closeSync(fd);
  }
}
