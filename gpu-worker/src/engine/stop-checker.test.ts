import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { StopStringChecker } from "./stop-checker.ts";

/** Feeds deltas; returns everything emitted (plus the flush when no stop hit) and whether it stopped. */
function run(stops: string[], deltas: string[]): { text: string; stopped: boolean; emits: string[] } {
  const c = new StopStringChecker(stops);
  const emits: string[] = [];
  for (const d of deltas) {
    const r = c.push(d);
    emits.push(r.emit);
    if (r.stopped) return { text: emits.join(""), stopped: true, emits };
  }
  emits.push(c.flush());
  return { text: emits.join(""), stopped: false, emits };
}

describe("StopStringChecker", () => {
  it("passes text straight through without stop strings", () => {
    expect(run([], ["Hel", "lo"]).emits).toEqual(["Hel", "lo", ""]);
  });

  it("stops on a stop string split across deltas and emits only the text before it", () => {
    const c = new StopStringChecker(["\nUser:"]);
    expect(c.push("Hello\nUs")).toEqual({ emit: "Hello", stopped: false });
    expect(c.push("er: more")).toEqual({ emit: "", stopped: true });
    expect(c.push("ignored")).toEqual({ emit: "", stopped: true });
    expect(c.flush()).toBe("");
  });

  it("releases held-back text once it can no longer start a stop string", () => {
    const c = new StopStringChecker(["\nUser:"]);
    expect(c.push("Hello\nUs")).toEqual({ emit: "Hello", stopped: false });
    expect(c.push("ually")).toEqual({ emit: "\nUsually", stopped: false });
  });

  it("flush returns held text when generation ends without a stop", () => {
    const c = new StopStringChecker(["STOP"]);
    expect(c.push("go ST")).toEqual({ emit: "go ", stopped: false });
    expect(c.flush()).toBe("ST");
  });

  it("stops in the middle of one delta", () => {
    expect(run(["STOP"], ["abc STOP def"])).toMatchObject({ text: "abc ", stopped: true });
  });

  it("handles a stop string that is a prefix of another ('ab' vs 'abc')", () => {
    expect(run(["abc", "ab"], ["xa", "b", "c"])).toMatchObject({ text: "x", stopped: true });
    expect(run(["abc", "ab"], ["xabc"])).toMatchObject({ text: "x", stopped: true });
    // "ab" alone completes first even though "abc" was listed first.
    const c = new StopStringChecker(["abc", "ab"]);
    expect(c.push("xa")).toEqual({ emit: "x", stopped: false });
    expect(c.push("b")).toEqual({ emit: "", stopped: true });
  });

  it("the first stop string to complete wins, however the text is split", () => {
    // "bc" completes before "abcd" does.
    expect(run(["abcd", "bc"], ["abcd"]).text).toBe("a");
    expect(run(["abcd", "bc"], ["ab", "c", "d"]).text).toBe("a");
    // Both end on the same character: the longer (earlier) one wins.
    expect(run(["bc", "abc"], ["xabc"]).text).toBe("x");
    expect(run(["world", "lo"], ["hello world"]).text).toBe("hel");
  });

  it("holds back a self-overlapping prefix correctly", () => {
    const c = new StopStringChecker(["aab"]);
    expect(c.push("a")).toEqual({ emit: "", stopped: false });
    expect(c.push("a")).toEqual({ emit: "", stopped: false });
    expect(c.push("a")).toEqual({ emit: "a", stopped: false });
    expect(c.push("b")).toEqual({ emit: "", stopped: true });
  });

  it("matches the whole-text answer for any split (property)", () => {
    const alphabet = fc.constantFrom("a", "b", "c");
    const word = fc.array(alphabet, { minLength: 1, maxLength: 4 }).map((cs) => cs.join(""));
    fc.assert(
      fc.property(
        fc.array(word, { maxLength: 3 }),
        fc.array(alphabet, { maxLength: 30 }).map((cs) => cs.join("")),
        fc.array(fc.nat(30), { maxLength: 6 }),
        (stops, text, cuts) => {
          // Reference: the occurrence with the smallest end, then the smallest start.
          let at = -1;
          let end = Number.POSITIVE_INFINITY;
          for (const s of stops) {
            const i = text.indexOf(s);
            if (i >= 0 && (i + s.length < end || (i + s.length === end && i < at))) [at, end] = [i, i + s.length];
          }
          const points = [...new Set(cuts.map((c) => Math.min(c, text.length)))].sort((a, b) => a - b);
          const deltas = [...points, text.length].map((p, i, all) => text.slice(i === 0 ? 0 : all[i - 1], p));
          const got = run(stops, deltas);
          expect(got.stopped).toBe(at >= 0);
          expect(got.text).toBe(at >= 0 ? text.slice(0, at) : text);
        },
      ),
      { numRuns: 500 },
    );
  });
});
