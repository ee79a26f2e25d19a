/**
 * Streaming detokenization on the Llama-2 tokenizer: the deltas concatenate to decode(prompt + generated) minus
 * decode(prompt), no delta runs ahead of the text decoded so far (so no premature U+FFFD), and the decoded
 * window stays small.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { llama2TokenizerFiles } from "../tokenizer/llama2-tokenizer.ts";
import { LlamaTokenizer } from "../tokenizer/tokenizer.ts";
import { type DetokenizerTokenizer, IncrementalDetokenizer } from "./detokenizer.ts";

const files = llama2TokenizerFiles();
const tok = new LlamaTokenizer(files.tokenizerJson, files.tokenizerConfig);
const skip = { skipSpecialTokens: true };

/** Stream `generated` after `prompt`, checking every step; returns the deltas. */
function stream(prompt: number[], generated: number[]): string[] {
  const base = tok.decode(prompt, skip);
  const textAfter = (n: number) => {
    const full = tok.decode([...prompt, ...generated.slice(0, n)], skip);
    expect(full.startsWith(base)).toBe(true);
    return full.slice(base.length);
  };
  const expected = textAfter(generated.length);
  const detok = new IncrementalDetokenizer(tok, prompt);
  const deltas: string[] = [];
  let emitted = "";
  generated.forEach((id, i) => {
    deltas.push(detok.push(id));
    emitted += deltas.at(-1);
    // Never ahead of what the tokens so far decode to, nor of the final text.
    expect(textAfter(i + 1).startsWith(emitted)).toBe(true);
    expect(expected.startsWith(emitted)).toBe(true);
  });
  deltas.push(detok.flush());
  expect(deltas.join("")).toBe(expected);
  expect(detok.flush()).toBe("");
  return deltas;
}

const BOS = [1];
const hello = tok.encode("Hello");

describe("IncrementalDetokenizer", () => {
  it("gives the first generated token its leading space after a prompt", () => {
    const world = tok.encode("Hello world", { addSpecialTokens: false }).slice(1);
    expect(world).toEqual([3186]);
    expect(stream(hello, world).join("")).toBe(" world");
  });

  it("drops the leading space of the first token right after bos, as decode does", () => {
    const ids = tok.encode("Hello world", { addSpecialTokens: false });
    expect(stream(BOS, ids).join("")).toBe("Hello world");
    expect(stream([], ids).join("")).toBe(tok.decode(ids, skip));
  });

  it("never emits special tokens", () => {
    const ids = [15043, 3186, 2];
    expect(stream(BOS, ids)).toEqual(["Hello", " world", "", ""]);
  });

  const texts = [
    "café naïve résumé",
    "👋🌍 hello 🦙",
    "日本語のテキストと中文文本",
    "Ꙋ🦙Ꙋ Привет мир",
    "  spaces   and\nnewlines\n\n",
    "code: for (let i = 0; i < n; i++) { x += i; }",
  ];

  it.each(texts)("streams %j exactly, holding back split characters", (text) => {
    const ids = tok.encode(text, { addSpecialTokens: false });
    for (const prompt of [[], BOS, hello]) {
      const deltas = stream(prompt, ids);
      for (const d of deltas) expect(d).not.toContain("\uFFFD");
    }
  });

  it("emits nothing for the first bytes of an emoji and the whole emoji with its last byte", () => {
    const ids = tok.encode("👋", { addSpecialTokens: false });
    expect(ids).toEqual([29871, 243, 162, 148, 142]);
    expect(stream(hello, ids)).toEqual([" ", "", "", "", "👋", ""]);
  });

  it("flushes an incomplete character at the end as U+FFFD, like decode", () => {
    const ids = tok.encode("👋", { addSpecialTokens: false }).slice(0, 3);
    expect(stream(hello, ids).join("")).toBe(" \uFFFD");
  });

  it("keeps a byte-order mark in the middle of a byte run", () => {
    const bom = [0xef, 0xbb, 0xbf].map((b) => 3 + b);
    const ids = [3 + 0x41, ...bom, 3 + 0x42, ...bom];
    expect(stream(hello, ids).join("")).toBe("A\uFEFFB\uFEFF");
  });

  it("matches decode on random token sequences", () => {
    const specialId = fc.constantFrom(0, 1, 2);
    const byteToken = fc.integer({ min: 3, max: 258 });
    const anyToken = fc.integer({ min: 0, max: 31999 });
    const utf8Token = fc.constantFrom(...tok.encode("é中👋 ▁x", { addSpecialTokens: false }));
    const token = fc.oneof(
      { weight: 4, arbitrary: anyToken },
      { weight: 3, arbitrary: byteToken },
      { weight: 2, arbitrary: utf8Token },
      { weight: 1, arbitrary: specialId },
    );
    const prompt = fc.constantFrom([], BOS, hello, tok.encode("日本 café"), tok.encode("ends in bytes 👋🌍"));
    fc.assert(
      fc.property(prompt, fc.array(token, { maxLength: 40 }), (p, generated) => {
        stream(p, generated);
      }),
      { numRuns: 1000 },
    );
  });

  it("decodes a small window per token, not the whole sequence", () => {
    let longest = 0;
    const counting: DetokenizerTokenizer = {
      isSpecial: (id) => tok.isSpecial(id),
      decode: (ids, opts) => {
        longest = Math.max(longest, ids.length);
        return tok.decode(ids, opts);
      },
    };
    const text =
      "The llama is a domesticated South American camelid 🦙, widely used as a meat and pack animal. ".repeat(40);
    const prompt = tok.encode("Tell me about llamas.");
    const detok = new IncrementalDetokenizer(counting, prompt);
    const generated = tok.encode(text, { addSpecialTokens: false });
    let out = "";
    for (const id of generated) out += detok.push(id);
    out += detok.flush();
    expect(generated.length).toBeGreaterThan(1000);
    expect(out).toBe(tok.decode([...prompt, ...generated], skip).slice(tok.decode(prompt, skip).length));
    expect(longest).toBeLessThanOrEqual(10);
  });
});
