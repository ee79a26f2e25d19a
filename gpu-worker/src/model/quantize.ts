/**
 * Weight-only, block-wise quantization in the layout ONNX Runtime's `com.microsoft.MatMulNBits` reads.
 *
 * A weight matrix keeps Hugging Face's [out, in] = [N, K] layout. Each row is cut into blocks of `blockSize`
 * values along K (the last block zero-padded when K is not a multiple), and each block gets one float scale:
 * - int8: symmetric, scale = absmax / 127, stored value q = round(x / scale) + 128 (MatMulNBits' default zero
 *   point for 8 bits, so no zero points are stored): llama.cpp's Q8_0 with an f32 scale.
 * - int4: asymmetric, the block's range [min(x, 0), max(x, 0)] mapped onto 0..15 with a per-block zero point,
 *   two values per byte, low nibble first; zero points likewise packed two per byte per row.
 * Round to nearest. Dequantized, every value is within scale / 2 of the original (see `dequantizeRows`).
 *
 * Rows are independent, so quantizing q, k and v (or gate and up) separately and concatenating the results gives
 * exactly the quantized concatenation: the compiler streams one source tensor at a time.
 *
 * @module
 */

export type Quantization = "none" | "int8" | "int4";
export const QUANTIZATIONS: readonly Quantization[] = ["none", "int8", "int4"];

/** `--quantization`'s value, checked; `what` names the flag or variable in the error. */
export function parseQuantization(value: string | undefined, what = "--quantization"): Quantization {
  if (value === undefined || value === "") return "none";
  if (!(QUANTIZATIONS as readonly string[]).includes(value)) {
    throw new RangeError(`${what} must be one of ${QUANTIZATIONS.join(", ")}, got "${value}"`);
  }
  return value as Quantization;
}

/** llama.cpp's Q4_0/Q8_0 block size; MatMulNBits' measured fast paths here are at 32 (issue 9). */
export const QUANT_BLOCK_SIZE = 32;

export interface QuantizedRows {
  bits: 4 | 8;
  blockSize: number;
  /** Rows (out features). */
  n: number;
  /** Columns (in features) before padding. */
  k: number;
  /** [n, blocksPerRow, blockSize * bits / 8] */
  data: Uint8Array;
  /** [n, blocksPerRow] */
  scales: Float32Array;
  /** int4: [n, ceil(blocksPerRow / 2)] packed 4-bit zero points; int8: null (128 implied). */
  zeroPoints: Uint8Array | null;
}

export function blocksPerRow(k: number, blockSize: number): number {
  return Math.ceil(k / blockSize);
}

/** Bytes of one row's data, scales and zero points: what the packed weights file reserves per row. */
export function quantizedRowBytes(
  k: number,
  bits: 4 | 8,
  blockSize: number,
): { data: number; scales: number; zeroPoints: number } {
  const nb = blocksPerRow(k, blockSize);
  return { data: (nb * blockSize * bits) / 8, scales: nb * 4, zeroPoints: bits === 4 ? Math.ceil(nb / 2) : 0 };
}

/** A value a quantized block cannot represent: the checkpoint itself is broken. */
export class NonFiniteWeightError extends Error {
  override name = "NonFiniteWeightError";
  constructor(
    readonly row: number,
    readonly column: number,
    readonly value: number,
  ) {
    super(`non-finite weight ${value} at [${row}, ${column}]`);
  }
}

/**
 * Quantize an [n, k] row-major matrix.
 *
 * @throws NonFiniteWeightError when a value is NaN or infinite.
 * @example
 * const q = quantizeRows(weight, 4096, 11008, 4, 32); // MatMulNBits(K=11008, N=4096, bits=4, block_size=32)
 */
export function quantizeRows(w: Float32Array, n: number, k: number, bits: 4 | 8, blockSize: number): QuantizedRows {
  if (w.length !== n * k) throw new RangeError(`quantizeRows: ${w.length} values for [${n}, ${k}]`);
  if (blockSize < 16 || blockSize % 16 !== 0) throw new RangeError(`block size ${blockSize} is not a multiple of 16`);
  const nb = blocksPerRow(k, blockSize);
  const bytes = quantizedRowBytes(k, bits, blockSize);
  const data = new Uint8Array(n * bytes.data);
  const scales = new Float32Array(n * nb);
  const zeroPoints = bits === 4 ? new Uint8Array(n * bytes.zeroPoints) : null;
  const blockBytes = (blockSize * bits) / 8;
  for (let r = 0; r < n; r++) {
    const rowStart = r * k;
    for (let b = 0; b < nb; b++) {
      const start = rowStart + b * blockSize;
      const end = rowStart + Math.min(k, (b + 1) * blockSize);
      let lo = 0;
      let hi = 0;
      for (let i = start; i < end; i++) {
        const x = w[i];
        if (!(x - x === 0)) throw new NonFiniteWeightError(r, i - rowStart, x); // NaN or ±Infinity
        if (x < lo) lo = x;
        if (x > hi) hi = x;
      }
      const out = r * bytes.data + b * blockBytes;
      if (bits === 8) {
        // Scales are stored as float32: quantize with the stored value so the error bound holds for it.
        const scale = Math.fround(Math.max(hi, -lo) / 127);
        const inv = scale > 0 ? 1 / scale : 0;
        scales[r * nb + b] = scale;
        data.fill(128, out, out + blockBytes); // padding dequantizes to 0
        for (let i = start; i < end; i++) {
          data[out + i - start] = clamp(Math.round(w[i] * inv), -128, 127) + 128;
        }
      } else {
        const scale = Math.fround((hi - lo) / 15);
        const inv = scale > 0 ? 1 / scale : 0;
        const zp = clamp(Math.round(-lo * inv), 0, 15);
        scales[r * nb + b] = scale;
        const zpAt = r * bytes.zeroPoints + (b >> 1);
        (zeroPoints as Uint8Array)[zpAt] |= b & 1 ? zp << 4 : zp;
        data.fill(zp | (zp << 4), out, out + blockBytes); // padding dequantizes to 0
        for (let i = start; i < end; i++) {
          const q = clamp(Math.round(w[i] * inv) + zp, 0, 15);
          const j = i - start;
          const at = out + (j >> 1);
          data[at] = j & 1 ? (data[at] & 0x0f) | (q << 4) : (data[at] & 0xf0) | q;
        }
      }
    }
  }
  return { bits, blockSize, n, k, data, scales, zeroPoints };
}

function clamp(x: number, lo: number, hi: number): number {
  return Math.min(hi, Math.max(lo, x));
}

/** The [n, k] matrix a quantized one stands for: what MatMulNBits multiplies by. */
export function dequantizeRows(q: QuantizedRows): Float32Array {
  const { n, k, bits, blockSize } = q;
  const nb = blocksPerRow(k, blockSize);
  const bytes = quantizedRowBytes(k, bits, blockSize);
  const out = new Float32Array(n * k);
  for (let r = 0; r < n; r++) {
    for (let c = 0; c < k; c++) {
      const b = Math.floor(c / blockSize);
      const j = c % blockSize;
      const scale = q.scales[r * nb + b];
      let value: number;
      let zp: number;
      if (bits === 8) {
        value = q.data[r * bytes.data + c];
        zp = 128;
      } else {
        const byte = q.data[r * bytes.data + b * (blockSize / 2) + (j >> 1)];
        value = j & 1 ? byte >> 4 : byte & 0x0f;
        const zpByte = (q.zeroPoints as Uint8Array)[r * bytes.zeroPoints + (b >> 1)];
        zp = b & 1 ? zpByte >> 4 : zpByte & 0x0f;
      }
      out[r * k + c] = (value - zp) * scale;
    }
  }
  return out;
}
