import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { expectLoadError } from "../../test/expect-load-error.ts";
import {
  f16BitsToF32,
  f32BitsToBf16Bits,
  f32BitsToF16Bits,
  openCheckpointTensors,
  readSafetensorsHeader,
  readTensorF16Bits,
  readTensorF32,
  type SafetensorsDtype,
  writeSafetensors,
} from "./safetensors.ts";

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "safetensors-test-"));
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** Write one tensor of `values` and read it back as f32. */
function roundTrip(values: number[], dtype: SafetensorsDtype): Float32Array {
  const file = join(dir, `${dtype}.safetensors`);
  writeSafetensors(file, [{ name: "t", dtype, shape: [values.length], data: new Float32Array(values) }]);
  return readTensorF32(readSafetensorsHeader(file).get("t")!);
}

/** A file with a hand-made header: `header` is JSON-encoded unless already a string. */
function writeRaw(file: string, header: unknown, dataBytes: number, headerLen?: bigint): void {
  const json = Buffer.from(typeof header === "string" ? header : JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(headerLen ?? BigInt(json.length));
  writeFileSync(file, Buffer.concat([len, json, Buffer.alloc(dataBytes)]));
}

const f32Bits = (x: number) => new Uint32Array(new Float32Array([x]).buffer)[0];
const bf16ToF32 = (b: number) => new Float32Array(new Uint32Array([b << 16]).buffer)[0];

describe("round trips", () => {
  it("F32 is exact, including -0, inf, nan and subnormals", () => {
    const values = [0, -0, 1, -2.5, 1e-40, -1e-45, Infinity, -Infinity, Number.NaN, 3.4028234663852886e38];
    const back = roundTrip(values, "F32");
    for (const [i, v] of values.entries()) expect(Object.is(back[i], Math.fround(v)), `index ${i}`).toBe(true);
  });

  it("F16 rounds to nearest even and keeps inf, nan, -0 and subnormals", () => {
    const cases: [number, number][] = [
      [1, 1],
      [1 + 2 ** -11, 1], // halfway, ties to the even mantissa (0)
      [1 + 3 * 2 ** -11, 1 + 2 ** -9], // halfway between mantissas 1 and 2: to 2
      [1 + 2 ** -11 + 2 ** -20, 1 + 2 ** -10], // just above halfway
      [0.1, 0.0999755859375],
      [65504, 65504], // largest finite half
      [65519, 65504],
      [65520, Infinity], // halfway to 2^16: ties to even, which is inf
      [-1e6, -Infinity],
      [2 ** -24, 2 ** -24], // smallest subnormal
      [2 ** -25, 0], // halfway between 0 and 2^-24: to 0
      [3 * 2 ** -25, 2 ** -23], // halfway between 1 and 2 units: to 2
      [2 ** -14 - 2 ** -25, 2 ** -14], // rounding carries from the subnormals into the smallest normal
      [2 ** -26, 0],
      [1e-40, 0], // f32 subnormal underflows
      [-0, -0],
      [Infinity, Infinity],
      [-Infinity, -Infinity],
    ];
    const back = roundTrip(
      cases.map(([x]) => x),
      "F16",
    );
    for (const [i, [x, want]] of cases.entries()) {
      expect(Object.is(back[i], want), `${x} -> ${back[i]}, want ${want}`).toBe(true);
    }
    expect(Number.isNaN(roundTrip([Number.NaN], "F16")[0])).toBe(true);
  });

  it("BF16 rounds to nearest even and keeps inf, nan, -0 and subnormals", () => {
    const cases: [number, number][] = [
      [1, 1],
      [1 + 2 ** -8, 1],
      [1 + 3 * 2 ** -8, 1 + 2 ** -6],
      [1 + 2 ** -8 + 2 ** -20, 1 + 2 ** -7],
      [2 ** -130, 2 ** -130], // an f32 subnormal bf16 represents exactly
      [3.4028234663852886e38, Infinity], // f32 max is above the last bf16 halfway point
      [-0, -0],
      [-Infinity, -Infinity],
    ];
    const back = roundTrip(
      cases.map(([x]) => x),
      "BF16",
    );
    for (const [i, [x, want]] of cases.entries()) {
      expect(Object.is(back[i], want), `${x} -> ${back[i]}, want ${want}`).toBe(true);
    }
    expect(Number.isNaN(roundTrip([Number.NaN], "BF16")[0])).toBe(true);
  });

  it("decodes every half exactly and re-encodes it to the same bits", () => {
    for (let h = 0; h < 65536; h++) {
      const x = f16BitsToF32(h);
      if (Number.isNaN(x)) {
        expect((h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0).toBe(true);
        expect(Number.isNaN(f16BitsToF32(f32BitsToF16Bits(f32Bits(x))))).toBe(true);
      } else {
        expect(f32BitsToF16Bits(f32Bits(x))).toBe(h);
      }
    }
  });

  it("f32 -> f16 picks the nearest half, ties to even (property)", () => {
    fc.assert(
      fc.property(fc.float({ noNaN: true }), (x) => {
        const h = f32BitsToF16Bits(f32Bits(x));
        const v = f16BitsToF32(h);
        if (Math.abs(x) >= 65520) return v === Math.sign(x) * Infinity;
        if (!Number.isFinite(v)) return false;
        const err = Math.abs(x - v);
        for (const n of [h - 1, h + 1]) {
          if ((n & 0x7fff) > 0x7bff || (n & 0x8000) !== (h & 0x8000)) continue; // off the finite, same-sign range
          const d = Math.abs(x - f16BitsToF32(n));
          if (d < err || (d === err && (h & 1) === 1)) return false;
        }
        return true;
      }),
      { numRuns: 20_000 },
    );
  });

  it("f32 -> bf16 picks the nearest bfloat16, ties to even (property)", () => {
    fc.assert(
      fc.property(fc.float({ noNaN: true, noDefaultInfinity: true }), (x) => {
        const b = f32BitsToBf16Bits(f32Bits(x));
        const v = bf16ToF32(b);
        if (!Number.isFinite(v)) return Math.abs(x) > 3.3895313892515355e38;
        const err = Math.abs(x - v);
        for (const n of [b - 1, b + 1]) {
          if ((n & 0x7fff) > 0x7f7f || (n & 0x8000) !== (b & 0x8000)) continue;
          const d = Math.abs(x - bf16ToF32(n));
          if (d < err || (d === err && (b & 1) === 1)) return false;
        }
        return true;
      }),
      { numRuns: 20_000 },
    );
  });

  it("readTensorF16Bits converts F32 and BF16 storage to half bits and passes F16 through", () => {
    const values = [1, -2, 0.1, 65519, 1e-7, -0];
    for (const dtype of ["F32", "BF16", "F16"] as const) {
      const file = join(dir, `${dtype}.safetensors`);
      writeSafetensors(file, [{ name: "w", dtype, shape: [2, 3], data: new Float32Array(values) }]);
      const info = readSafetensorsHeader(file).get("w")!;
      const stored = readTensorF32(info); // what the file holds, widened exactly
      const want = Array.from(stored, (x) => f32BitsToF16Bits(f32Bits(x)));
      expect(Array.from(readTensorF16Bits(info)), dtype).toEqual(want);
    }
    expect(f32BitsToF16Bits(f32Bits(1))).toBe(0x3c00);
  });
});

describe("file layout", () => {
  it("pads the header to 8 bytes, records offsets and metadata, and reads back shapes", () => {
    const file = join(dir, "m.safetensors");
    writeSafetensors(
      file,
      [
        { name: "a", dtype: "F16", shape: [3], data: new Float32Array([1, 2, 3]) },
        { name: "b", dtype: "F32", shape: [2, 2], data: () => new Float32Array([1, 2, 3, 4]) },
        { name: "empty", dtype: "BF16", shape: [0, 4], data: new Float32Array(0) },
      ],
      { format: "pt" },
    );
    const bytes = readFileSync(file);
    const n = Number(bytes.readBigUInt64LE(0));
    expect(n % 8).toBe(0);
    expect(bytes.length).toBe(8 + n + 6 + 16);
    const header = JSON.parse(bytes.subarray(8, 8 + n).toString());
    expect(header.__metadata__).toEqual({ format: "pt" });
    expect(header.b).toEqual({ dtype: "F32", shape: [2, 2], data_offsets: [6, 22] });

    const infos = readSafetensorsHeader(file);
    expect([...infos.keys()]).toEqual(["a", "b", "empty"]);
    expect(infos.get("b")).toEqual({
      name: "b",
      dtype: "F32",
      shape: [2, 2],
      file,
      dataOffset: 8 + n + 6,
      byteLength: 16,
    });
    expect(Array.from(readTensorF32(infos.get("b")!))).toEqual([1, 2, 3, 4]);
    expect(readTensorF32(infos.get("empty")!).length).toBe(0);
  });

  it("rejects data that does not match the shape", () => {
    expect(() =>
      writeSafetensors(join(dir, "x.safetensors"), [
        { name: "t", dtype: "F32", shape: [2, 3], data: new Float32Array(5) },
      ]),
    ).toThrow(/t has 5 values/);
  });
});

describe("corrupt files", () => {
  it("missing file", () => {
    const file = join(dir, "nope.safetensors");
    expectLoadError(() => readSafetensorsHeader(file), file, "not found");
  });

  it("shorter than the length prefix", () => {
    const file = join(dir, "short.safetensors");
    writeFileSync(file, Buffer.from([1, 2, 3]));
    expectLoadError(() => readSafetensorsHeader(file), file, "too short");
  });

  it("absurd header length", () => {
    const file = join(dir, "huge.safetensors");
    writeRaw(file, {}, 64, 1n << 40n);
    expectLoadError(() => readSafetensorsHeader(file), file, "absurd");
  });

  it("header length past the end of the file", () => {
    const file = join(dir, "long.safetensors");
    writeRaw(file, {}, 16, 5000n);
    expectLoadError(() => readSafetensorsHeader(file), file, "exceeds the file size");
  });

  it("header is not JSON", () => {
    const file = join(dir, "garbage.safetensors");
    writeRaw(file, "{not json at all", 0);
    expectLoadError(() => readSafetensorsHeader(file), file, "not valid JSON");
  });

  it.each([
    ["I8", "unsupported"],
    ["F64", "unsupported"],
    ["Q4_K", "unknown"],
  ])("dtype %s is %s, naming the tensor and the supported dtypes", (dtype, kind) => {
    const file = join(dir, "dtype.safetensors");
    writeRaw(file, { "model.norm.weight": { dtype, shape: [4], data_offsets: [0, 4] } }, 4);
    const e = expectLoadError(
      () => readSafetensorsHeader(file),
      file,
      "model.norm.weight",
      `${kind} dtype "${dtype}"`,
      "F32, F16, BF16",
    );
    expect(e.tensor).toBe("model.norm.weight");
  });

  it("data_offsets inconsistent with shape x dtype", () => {
    const file = join(dir, "offsets.safetensors");
    writeRaw(file, { w: { dtype: "F32", shape: [2, 2], data_offsets: [0, 12] } }, 16);
    expectLoadError(() => readSafetensorsHeader(file), file, "(tensor w)", "needs 16");
  });

  it("truncated data names the first tensor that no longer fits", () => {
    const file = join(dir, "cut.safetensors");
    writeSafetensors(file, [
      { name: "first", dtype: "F32", shape: [4], data: new Float32Array(4) },
      { name: "second", dtype: "F32", shape: [64], data: new Float32Array(64) },
    ]);
    truncateSync(file, statSync(file).size - 10);
    expectLoadError(() => readSafetensorsHeader(file), file, "(tensor second)", "truncated");
  });
});

describe("checkpoint directories", () => {
  const t = (name: string, values: number[]) => ({
    name,
    dtype: "F32" as const,
    shape: [values.length],
    data: new Float32Array(values),
  });

  function writeSharded(): void {
    writeSafetensors(join(dir, "model-00001-of-00002.safetensors"), [t("a", [1, 2]), t("b", [3])]);
    writeSafetensors(join(dir, "model-00002-of-00002.safetensors"), [t("c", [4, 5, 6])]);
    const weight_map = {
      a: "model-00001-of-00002.safetensors",
      b: "model-00001-of-00002.safetensors",
      c: "model-00002-of-00002.safetensors",
    };
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: {}, weight_map }));
  }

  it("reads a single model.safetensors", () => {
    writeSafetensors(join(dir, "model.safetensors"), [t("x", [7])]);
    expect(Array.from(readTensorF32(openCheckpointTensors(dir).get("x")!))).toEqual([7]);
  });

  it("reads a sharded checkpoint through its index", () => {
    writeSharded();
    const infos = openCheckpointTensors(dir);
    expect([...infos.keys()].sort()).toEqual(["a", "b", "c"]);
    expect(infos.get("c")!.file).toBe(join(dir, "model-00002-of-00002.safetensors"));
    expect(Array.from(readTensorF32(infos.get("a")!))).toEqual([1, 2]);
    expect(Array.from(readTensorF32(infos.get("c")!))).toEqual([4, 5, 6]);
  });

  it("a shard listed in the index but missing", () => {
    writeSharded();
    rmSync(join(dir, "model-00002-of-00002.safetensors"));
    expectLoadError(
      () => openCheckpointTensors(dir),
      join(dir, "model-00002-of-00002.safetensors"),
      "(tensor c)",
      "not found",
    );
  });

  it("a shard that lacks a tensor the index places in it", () => {
    writeSharded();
    writeSafetensors(join(dir, "model-00002-of-00002.safetensors"), [t("other", [1])]);
    expectLoadError(() => openCheckpointTensors(dir), "model-00002-of-00002.safetensors", "(tensor c)", "not there");
  });

  it("a shard path that escapes the directory", () => {
    const weight_map = { a: "../elsewhere.safetensors" };
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ weight_map }));
    expectLoadError(
      () => openCheckpointTensors(dir),
      "model.safetensors.index.json",
      "leaves the checkpoint directory",
    );
  });

  it("no safetensors at all", () => {
    writeFileSync(join(dir, "config.json"), "{}");
    writeFileSync(join(dir, "pytorch_model.bin"), "");
    expectLoadError(() => openCheckpointTensors(dir), dir, "no model.safetensors", "convert it to safetensors");
  });

  it("missing directory", () => {
    const missing = join(dir, "does-not-exist");
    expectLoadError(() => openCheckpointTensors(missing), missing, "directory not found");
    mkdirSync(join(dir, "sub"));
    writeFileSync(join(dir, "sub", "file"), "");
    expectLoadError(() => openCheckpointTensors(join(dir, "sub", "file")), "not a directory");
  });
});
