/**
 * The JSON numbers (or integers) within a range, as a grammar: `{"type": "number", "minimum": 1.5, "maximum": 2.5}`
 * and the exclusive bounds. XGrammar 0.1.27 converts these wrongly (it lets `-2.3` through for [-2, -1], any
 * character stand for the decimal point in [1.5, 2.5], and 516 through for the integers [507, 515]), so
 * grammar.ts splices this grammar in instead.
 *
 * Written numbers have an optional `-`, an integer part without leading zeros and up to 6 fraction digits, no
 * exponent: every value in the range that can be written so is allowed, nothing else (bounds with more digits are
 * rounded inwards). The range splits into integer parts whose whole unit interval lies inside (any fraction), and at
 * most two boundary integer parts whose fraction digits are themselves ranges.
 *
 * @module
 */

/** Bounds as JSON Schema gives them; absent means unbounded on that side. */
export interface NumberBounds {
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number;
  exclusiveMaximum?: number;
}

const FRACTION_DIGITS = 6;
const SCALE = 10n ** BigInt(FRACTION_DIGITS);

/** One way to write a run of numbers: a sequence of terminals (`"-"`, `"."`, a digit or a class, `[0-9]*`). */
type Sequence = string[];

const digit = (d: number | string) => `"${d}"`;
const digitClass = (lo: number, hi: number) => (lo === hi ? digit(lo) : `[${lo}-${hi}]`);

/** Digit strings of one length from `a` to `b` (same length, a <= b as numbers). */
function fixedWidth(a: string, b: string): Sequence[] {
  if (a.length === 0) return [[]];
  const restLen = a.length - 1;
  const tail = (s: Sequence[], head: string) => s.map((seq) => [head, ...seq]);
  if (a[0] === b[0]) return tail(fixedWidth(a.slice(1), b.slice(1)), digit(a[0]!));
  const out: Sequence[] = [];
  let from = Number(a[0]);
  let to = Number(b[0]);
  const lowWhole = /^0*$/.test(a.slice(1));
  const highWhole = /^9*$/.test(b.slice(1));
  if (!lowWhole) {
    out.push(...tail(fixedWidth(a.slice(1), "9".repeat(restLen)), digit(from)));
    from++;
  }
  if (!highWhole) to--;
  if (from <= to) out.push([digitClass(from, to), ...Array<string>(restLen).fill("[0-9]")]);
  if (!highWhole) out.push(...tail(fixedWidth("0".repeat(restLen), b.slice(1)), digit(b[0]!)));
  return out;
}

/** Non-negative integers from `a` to `b` (null: unbounded), without leading zeros. */
function integers(a: bigint, b: bigint | null): Sequence[] {
  const out: Sequence[] = [];
  const first = a.toString().length;
  const last = b === null ? first : b.toString().length;
  for (let len = first; len <= last; len++) {
    const lo = len === first ? a : 10n ** BigInt(len - 1);
    const hi = b !== null && len === last ? b : 10n ** BigInt(len) - 1n;
    if (lo <= hi) out.push(...fixedWidth(lo.toString().padStart(len, "0"), hi.toString().padStart(len, "0")));
  }
  if (b === null) out.push(["[1-9]", ...Array<string>(first).fill("[0-9]"), "[0-9]*"]);
  return out;
}

/** Fraction digit strings (1 to 6 digits) whose value, scaled by 10^6, is between a and b. */
function fractions(a: bigint, b: bigint): Sequence[] {
  const out: Sequence[] = [];
  for (let len = 1; len <= FRACTION_DIGITS; len++) {
    const unit = 10n ** BigInt(FRACTION_DIGITS - len);
    const lo = (a + unit - 1n) / unit;
    const hi = b / unit;
    if (lo <= hi) out.push(...fixedWidth(lo.toString().padStart(len, "0"), hi.toString().padStart(len, "0")));
  }
  return out;
}

const ANY_FRACTION: Sequence[] = [["(", '"."', "[0-9]", "[0-9]?", "[0-9]?", "[0-9]?", "[0-9]?", "[0-9]?", ")?"]];

/** Non-negative numbers whose value × 10^6 is between lo and hi (null: unbounded). */
function nonNegative(lo: bigint, hi: bigint | null): Sequence[] {
  if (hi !== null && hi < lo) return [];
  const out: Sequence[] = [];
  const withFraction = (ints: Sequence[], fr: Sequence[]) =>
    ints.flatMap((i) => fr.map((f) => (f[0] === "(" ? [...i, ...f] : [...i, '"."', ...f])));
  // Integer parts m whose whole [m, m + 1) is in range take any fraction.
  const firstWhole = (lo + SCALE - 1n) / SCALE;
  const lastWhole = hi === null ? null : hi >= SCALE - 1n ? (hi - (SCALE - 1n)) / SCALE : -1n;
  const hasWhole = lastWhole === null || lastWhole >= firstWhole;
  if (hasWhole) out.push(...withFraction(integers(firstWhole, lastWhole), ANY_FRACTION));
  // The (at most two) others are cut by a bound: their fraction digits are a range too.
  const isWhole = (m: bigint) => hasWhole && m >= firstWhole && (lastWhole === null || m <= lastWhole);
  for (const m of new Set([lo / SCALE, ...(hi === null ? [] : [hi / SCALE])])) {
    if (isWhole(m)) continue;
    const base = m * SCALE;
    const fLo = lo > base ? lo - base : 0n;
    const fHi = hi === null || hi - base > SCALE - 1n ? SCALE - 1n : hi - base;
    if (fHi < fLo) continue;
    const ints = integers(m, m);
    if (fLo === 0n) out.push(...ints);
    out.push(...withFraction(ints, fractions(fLo, fHi)));
  }
  return out;
}

/** x × 10^6, rounded up (for a lower bound) or down (an upper one), exactly from the number's decimal form. */
function scaled(x: number, round: "up" | "down"): bigint {
  const [mantissa, exp = "0"] = x.toExponential().split("e");
  const [intPart, frac = ""] = mantissa!.replace("-", "").split(".");
  const digits = BigInt(intPart! + frac);
  const shift = Number(exp) - frac.length + FRACTION_DIGITS;
  let v: bigint;
  if (shift >= 0) v = digits * 10n ** BigInt(shift);
  else {
    const div = 10n ** BigInt(-shift);
    const exact = digits % div === 0n;
    // rounding a magnitude: towards the inside of the range depends on the sign
    const away = (round === "up") !== x < 0;
    v = digits / div + (!exact && away ? 1n : 0n);
  }
  return x < 0 ? -v : v;
}

/** The range as scaled integers [lo, hi] (null: unbounded), or null when it holds no writable number. */
function scaledRange(b: NumberBounds): [bigint | null, bigint | null] | null {
  let lo: bigint | null = null;
  let hi: bigint | null = null;
  if (b.minimum !== undefined) lo = scaled(b.minimum, "up");
  if (b.exclusiveMinimum !== undefined) {
    const s = scaled(b.exclusiveMinimum, "up");
    const v = s === scaled(b.exclusiveMinimum, "down") ? s + 1n : s;
    lo = lo === null || v > lo ? v : lo;
  }
  if (b.maximum !== undefined) hi = scaled(b.maximum, "down");
  if (b.exclusiveMaximum !== undefined) {
    const s = scaled(b.exclusiveMaximum, "down");
    const v = s === scaled(b.exclusiveMaximum, "up") ? s - 1n : s;
    hi = hi === null || v < hi ? v : hi;
  }
  if (lo !== null && hi !== null && lo > hi) return null;
  return [lo, hi];
}

const floorDiv = (a: bigint, d: bigint) => (a >= 0n ? a / d : -((-a + d - 1n) / d));
const ceilDiv = (a: bigint, d: bigint) => -floorDiv(-a, d);

/** Integers within the scaled range: "-"? and digits without leading zeros. */
function integerSequences(lo: bigint | null, hi: bigint | null): Sequence[] {
  const a = lo === null ? null : ceilDiv(lo, SCALE);
  const b = hi === null ? null : floorDiv(hi, SCALE);
  if (a !== null && b !== null && a > b) return [];
  const out: Sequence[] = [];
  if (b === null || b >= 0n) out.push(...integers(a === null || a < 0n ? 0n : a, b));
  if (a === null || a < 0n) {
    const uHi = a === null ? null : -a;
    const uLo = b === null || b >= 0n ? 1n : -b;
    if (uHi === null || uLo <= uHi) out.push(...integers(uLo, uHi).map((s) => ['"-"', ...s]));
  }
  return out;
}

function sequences(b: NumberBounds, integer: boolean): Sequence[] {
  const range = scaledRange(b);
  if (!range) return [];
  const [lo, hi] = range;
  if (integer) return integerSequences(lo, hi);
  const out: Sequence[] = [];
  if (hi === null || hi >= 0n) out.push(...nonNegative(lo === null || lo < 0n ? 0n : lo, hi));
  if (lo === null || lo < 0n) {
    // -u for u from max(1, -hi) to -lo: "-0" is left out
    const uLo = hi === null || hi >= 0n ? 1n : -hi;
    out.push(...nonNegative(uLo, lo === null ? null : -lo).map((s) => ['"-"', ...s]));
  }
  return out;
}

/**
 * An EBNF expression (XGrammar's dialect) for the numbers (or, with `integer`, the integers) within `bounds`; null
 * when none can be written (the range is empty, or narrower than 10^-6 between bounds).
 *
 * @example
 * numberRangeEbnf({ minimum: 0, maximum: 1 }) // '("0" ("." [0-9] ...)? | "1" | ...)'
 */
export function numberRangeEbnf(bounds: NumberBounds, integer = false): string | null {
  const seqs = sequences(bounds, integer);
  if (seqs.length === 0) return null;
  return `(${seqs.map((s) => s.join(" ").replace(/\( /g, "(").replace(/ \)\?/g, ")?")).join(" | ")})`;
}

/** The same language as a JavaScript RegExp (for tests). */
export function numberRangeRegExp(bounds: NumberBounds, integer = false): RegExp {
  const seqs = sequences(bounds, integer);
  const term = (t: string) => (t.startsWith('"') ? t.slice(1, -1).replace(/[.-]/g, "\\$&") : t === ")?" ? ")?" : t);
  return new RegExp(`^(?:${seqs.map((s) => s.map(term).join("").replace(/\(/g, "(?:")).join("|") || "(?!)"})$`);
}
