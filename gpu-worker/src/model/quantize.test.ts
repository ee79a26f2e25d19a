import fc from "fast-check";
import * as ort from "onnxruntime-node";
import { describe, expect, it } from "vitest";
import { DType, GraphBuilder } from "./onnx-builder.ts";
import { blocksPerRow, dequantizeRows, NonFiniteWeightError, quantizeRows } from "./quantize.ts";

/** Every dequantized value is within half a step (its block's scale / 2) of the original. */
function expectWithinBound(w: Float32Array, n: number, k: number, bits: 4 | 8, bs = 32): void {
  const q = quantizeRows(w, n, k, bits, bs);
  const dq = dequantizeRows(q);
  const nb = blocksPerRow(k, bs);
  for (let r = 0; r < n; r++) {
    for (let c = 0; c < k; c++) {
      const scale = q.scales[r * nb + Math.floor(c / bs)];
      const err = Math.abs(dq[r * k + c] - w[r * k + c]);
      // half a step, plus float32 rounding of the product and the scale
      const bound = scale / 2 + Math.abs(w[r * k + c]) * 2 ** -22 + 2 ** -149;
      if (!(err <= bound)) {
        throw new Error(`[${r}, ${c}]: |${dq[r * k + c]} - ${w[r * k + c]}| = ${err} > ${bound} (scale ${scale})`);
      }
    }
  }
}

const adversarialBlocks: [string, number[]][] = [
  ["zeros", Array(32).fill(0)],
  ["one outlier among small values", [1000, ...Array(31).fill(0.001)]],
  ["negative outlier", [...Array(31).fill(0.5), -1e4]],
  ["all positive", Array.from({ length: 32 }, (_, i) => 1 + i)],
  ["all negative", Array.from({ length: 32 }, (_, i) => -1 - i)],
  ["denormals", Array.from({ length: 32 }, (_, i) => (i - 16) * 1e-42)],
  ["tiny normals", Array.from({ length: 32 }, (_, i) => (i - 16) * 1e-37)],
  ["huge", Array.from({ length: 32 }, (_, i) => (i - 16) * 1e37)],
  ["constant", Array(32).fill(-3.25)],
];

describe("quantizeRows / dequantizeRows", () => {
  for (const bits of [4, 8] as const) {
    it.each(adversarialBlocks)(`int${bits}: %s stay within half a step`, (_, values) => {
      expectWithinBound(Float32Array.from(values), 1, 32, bits);
    });

    it(`int${bits}: random matrices stay within half a step (property)`, () => {
      fc.assert(
        fc.property(
          fc.integer({ min: 1, max: 5 }),
          fc.integer({ min: 1, max: 200 }),
          fc.float({ min: Math.fround(1e-3), max: Math.fround(100), noNaN: true }),
          fc.integer(),
          (n, k, std, seed) => {
            let s = seed | 0;
            const next = () => {
              s = (Math.imul(s, 1664525) + 1013904223) | 0;
              return (s >>> 0) / 2 ** 32 - 0.5;
            };
            expectWithinBound(
              Float32Array.from({ length: n * k }, () => next() * std),
              n,
              k,
              bits,
            );
          },
        ),
        { numRuns: 200 },
      );
    });
  }

  it("zero blocks dequantize to exact zeros, and int8 of a value that is a multiple of its step is exact", () => {
    expect([...dequantizeRows(quantizeRows(new Float32Array(64), 2, 32, 4, 32))].every((x) => x === 0)).toBe(true);
    const w = Float32Array.from({ length: 32 }, (_, i) => (i - 16) / 127);
    w[0] = -1; // absmax 1 -> scale 1/127
    const dq = dequantizeRows(quantizeRows(w, 1, 32, 8, 32));
    for (let i = 1; i < 32; i++) expect(dq[i]).toBeCloseTo(w[i], 6);
  });

  it("refuses NaN and infinite weights, naming the position", () => {
    const w = new Float32Array(64);
    w[37] = Number.NaN;
    expect(() => quantizeRows(w, 2, 32, 4, 32)).toThrow(NonFiniteWeightError);
    expect(() => quantizeRows(w, 2, 32, 4, 32)).toThrow("[1, 5]");
    w[37] = Number.POSITIVE_INFINITY;
    expect(() => quantizeRows(w, 2, 32, 8, 32)).toThrow("non-finite weight Infinity");
  });
});

/** y = x · Wᵀ through ONNX Runtime's MatMulNBits, from the quantized matrix as the compiler stores it. */
async function matMulNBits(x: Float32Array, rows: number, w: ReturnType<typeof quantizeRows>, level: number) {
  const g = new GraphBuilder();
  const a = g.input("a", DType.float, [rows, w.k]);
  const nb = blocksPerRow(w.k, w.blockSize);
  const inputs = [
    a,
    g.input("b", DType.uint8, [w.n, nb, (w.blockSize * w.bits) / 8]),
    g.input("s", DType.float, [w.n * nb]),
  ];
  if (w.zeroPoints) inputs.push(g.input("zp", DType.uint8, [w.zeroPoints.length]));
  g.op(
    "MatMulNBits",
    inputs,
    { K: w.k, N: w.n, bits: w.bits, block_size: w.blockSize, accuracy_level: level },
    "y",
    "com.microsoft",
  );
  g.output("y", DType.float, [rows, w.n]);
  const session = await ort.InferenceSession.create(g.build("mmnb"));
  const feeds: Record<string, ort.Tensor> = {
    a: new ort.Tensor("float32", x, [rows, w.k]),
    b: new ort.Tensor("uint8", w.data, [w.n, nb, (w.blockSize * w.bits) / 8]),
    s: new ort.Tensor("float32", w.scales, [w.n * nb]),
  };
  if (w.zeroPoints) feeds.zp = new ort.Tensor("uint8", w.zeroPoints, [w.zeroPoints.length]);
  const y = (await session.run(feeds)).y.data as Float32Array;
  await session.release();
  return y;
}

describe("the layout is the one ONNX Runtime's MatMulNBits reads", () => {
  // 172 in-features: not a multiple of the block (the last block is padded), as some small models have
  for (const [bits, k] of [
    [4, 172],
    [8, 172],
    [4, 256],
    [8, 96],
  ] as const) {
    it(`int${bits}, K=${k}: equals x · dequantize(W)ᵀ`, async () => {
      const n = 24;
      const rows = 3;
      let s = 12345 + k * bits;
      const next = () => {
        s = (Math.imul(s, 1664525) + 1013904223) | 0;
        return (s >>> 0) / 2 ** 32 - 0.5;
      };
      const w = Float32Array.from({ length: n * k }, next);
      const x = Float32Array.from({ length: rows * k }, next);
      const q = quantizeRows(w, n, k, bits, 32);
      const dq = dequantizeRows(q);
      const want = new Float32Array(rows * n);
      for (let r = 0; r < rows; r++)
        for (let j = 0; j < n; j++) {
          let acc = 0;
          for (let c = 0; c < k; c++) acc += x[r * k + c] * dq[j * k + c];
          want[r * n + j] = acc;
        }
      const exact = await matMulNBits(x, rows, q, 0);
      for (let i = 0; i < want.length; i++) expect(exact[i]).toBeCloseTo(want[i], 4);
      // accuracy_level 4 (int8 activations, the engine's setting): close, not exact
      const fast = await matMulNBits(x, rows, q, 4);
      for (let i = 0; i < want.length; i++) expect(Math.abs(fast[i] - want[i])).toBeLessThan(0.02);
    });
  }
});
