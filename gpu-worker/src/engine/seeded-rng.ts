/**
 * The per-request random generator: one per request, so a seeded request's tokens depend only on its seed.
 *
 * @module
 */

import { getRandomValues } from "node:crypto";

const MASK64 = (1n << 64n) - 1n;

/**
 * xoshiro128** seeded through splitmix64. Each request owns one, so a seeded request's tokens depend only on
 * its seed and its own draws, never on the rest of the batch.
 */
export class SeededRng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  /** @param seed any safe integer (negative ones too); distinct seeds give distinct streams. */
  constructor(seed: number) {
    if (!Number.isSafeInteger(seed)) throw new RangeError(`SeededRng: seed must be a safe integer, got ${seed}`);
    let x = BigInt.asUintN(64, BigInt(seed));
    const words: number[] = [];
    for (let i = 0; i < 2; i++) {
      x = (x + 0x9e3779b97f4a7c15n) & MASK64;
      let z = x;
      z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
      z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
      z ^= z >> 31n;
      words.push(Number(z & 0xffffffffn), Number(z >> 32n));
    }
    [this.s0, this.s1, this.s2, this.s3] = words;
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1; // the all-zero state is a fixed point
  }

  /** A generator for `seed`, or one seeded from the OS entropy source when seed is null. */
  static forSeed(seed: number | null): SeededRng {
    if (seed !== null) return new SeededRng(seed);
    const [hi, lo] = getRandomValues(new Uint32Array(2));
    return new SeededRng((hi & 0x1fffff) * 2 ** 32 + lo);
  }

  /** Uniform in [0, 1) with 53 random bits. */
  next(): number {
    const a = this.nextUint32() >>> 5;
    const b = this.nextUint32() >>> 6;
    return (a * 67108864 + b) / 9007199254740992;
  }

  private nextUint32(): number {
    const s1 = this.s1;
    const result = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0;
    const t = s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
