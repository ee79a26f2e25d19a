import { describe, expect, it } from "vitest";
import { SeededRng } from "./seeded-rng.ts";

describe("SeededRng", () => {
  it("is reproducible per seed, distinct across seeds, and uniform in [0, 1)", () => {
    const draw = (rng: SeededRng, n: number) => Array.from({ length: n }, () => rng.next());
    expect(draw(new SeededRng(42), 5)).toEqual(draw(new SeededRng(42), 5));
    expect(draw(new SeededRng(42), 5)).not.toEqual(draw(new SeededRng(43), 5));
    expect(draw(new SeededRng(-1), 5)).not.toEqual(draw(new SeededRng(2 ** 53 - 1), 5));
    const xs = draw(new SeededRng(7), 20000);
    expect(xs.every((x) => x >= 0 && x < 1)).toBe(true);
    const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
    expect(Math.abs(mean - 0.5)).toBeLessThan(0.01);
    expect(draw(SeededRng.forSeed(null), 3)).not.toEqual(draw(SeededRng.forSeed(null), 3));
    expect(() => new SeededRng(0.5)).toThrow(RangeError);
  });
});
