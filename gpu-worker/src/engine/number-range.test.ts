import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { type NumberBounds, numberRangeEbnf, numberRangeRegExp } from "./number-range.ts";

/** What the grammar must accept: a plain decimal (≤ 6 fraction digits, no leading zeros) inside the bounds. */
function inRange(text: string, b: NumberBounds, integer = false): boolean {
  if (!/^-?(0|[1-9][0-9]*)(\.[0-9]{1,6})?$/.test(text) || text === "-0" || /^-0\.0*$/.test(text)) return false;
  if (integer && text.includes(".")) return false;
  const v = Number(text);
  return (
    (b.minimum === undefined || v >= b.minimum) &&
    (b.maximum === undefined || v <= b.maximum) &&
    (b.exclusiveMinimum === undefined || v > b.exclusiveMinimum) &&
    (b.exclusiveMaximum === undefined || v < b.exclusiveMaximum)
  );
}

const decimal = fc
  .tuple(fc.boolean(), fc.integer({ min: 0, max: 3000 }), fc.option(fc.stringMatching(/^[0-9]{1,6}$/)))
  .map(([neg, i, f]) => `${neg ? "-" : ""}${i}${f === null ? "" : `.${f}`}`);
const bound = fc.option(
  fc.tuple(fc.integer({ min: -3000, max: 3000 }), fc.constantFrom(1, 10, 100, 1000)).map(([n, d]) => n / d),
  { nil: undefined },
);

describe("numberRangeEbnf", () => {
  it("accepts exactly the plain decimals within the bounds (property)", () => {
    fc.assert(
      fc.property(
        fc.record(
          { minimum: bound, maximum: bound, exclusiveMinimum: bound, exclusiveMaximum: bound },
          { requiredKeys: [] },
        ),
        fc.array(decimal, { minLength: 20, maxLength: 40 }),
        fc.boolean(),
        (b, texts, integer) => {
          const re = numberRangeRegExp(b, integer);
          for (const t of texts) expect(re.test(t), `${t} in ${JSON.stringify(b)}`).toBe(inRange(t, b, integer));
        },
      ),
      { numRuns: 500 },
    );
  });

  it("handles the cases XGrammar gets wrong, and boundaries", () => {
    const neg = numberRangeRegExp({ minimum: -2, maximum: -1 });
    expect(["-2", "-1.5", "-1", "-1.999999", "-2.0"].every((t) => neg.test(t))).toBe(true);
    expect(["-2.3", "-0.5", "-3", "0"].some((t) => neg.test(t))).toBe(false);
    const mid = numberRangeRegExp({ minimum: 1.5, maximum: 2.5 });
    expect(["1.5", "2", "2.5", "1.75", "2.49"].every((t) => mid.test(t))).toBe(true);
    expect(["1x5", "1.4", "2.51", "3"].some((t) => mid.test(t))).toBe(false);
    const open = numberRangeRegExp({ exclusiveMinimum: 0, exclusiveMaximum: 1 });
    expect(open.test("0.000001") && open.test("0.5") && !open.test("0") && !open.test("1")).toBe(true);
    const low = numberRangeRegExp({ minimum: 10 });
    expect(low.test("10") && low.test("123456789.5") && !low.test("9.99")).toBe(true);
    const ints = numberRangeRegExp({ minimum: 507, maximum: 515 }, true);
    expect(["507", "510", "515"].every((t) => ints.test(t)) && !["500", "516", "510.5"].some((t) => ints.test(t))).toBe(
      true,
    );
    expect(numberRangeEbnf({ minimum: 2, maximum: 1 })).toBeNull();
    expect(numberRangeEbnf({ exclusiveMinimum: 0.0000001, exclusiveMaximum: 0.0000009 })).toBeNull();
  });
});
