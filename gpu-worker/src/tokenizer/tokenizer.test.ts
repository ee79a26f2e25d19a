/**
 * The rebuilt Llama-2 tokenizer against `llama-tokenizer-js` (a faithful Llama-2 implementation) and ids copied
 * from the real one; bos handling for Llama-2 and Llama-3 style configs; the chat template; load errors.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import llamaTokenizerJs from "llama-tokenizer-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ModelLoadError } from "../model/errors.ts";
import { llama2TokenizerFiles } from "./llama2-tokenizer.ts";
import { type ChatMessage, ChatTemplateError, LlamaTokenizer } from "./tokenizer.ts";

type Json = Record<string, unknown>;

const files = llama2TokenizerFiles();
const tokenizerJson = files.tokenizerJson as Json;
const tokenizerConfig = files.tokenizerConfig as Json;

let dir: string;
let tok: LlamaTokenizer;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "llama2-tokenizer-"));
  writeFileSync(join(dir, "tokenizer.json"), JSON.stringify(tokenizerJson));
  writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(tokenizerConfig));
  tok = LlamaTokenizer.fromDir(dir);
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Write a model directory with the given files (JSON objects, or raw text). */
function modelDir(contents: Record<string, Json | string>): string {
  const d = mkdtempSync(join(dir, "case-"));
  for (const [name, value] of Object.entries(contents)) {
    writeFileSync(join(d, name), typeof value === "string" ? value : JSON.stringify(value));
  }
  return d;
}

describe("llama2TokenizerFiles", () => {
  it("has the Llama-2 vocab, merges in priority order and special tokens", () => {
    const model = tokenizerJson.model as { vocab: Record<string, number>; merges: string[] };
    expect(Object.keys(model.vocab)).toHaveLength(32000);
    expect(model.vocab["<unk>"]).toBe(0);
    expect(model.vocab["<0x0A>"]).toBe(13);
    expect(model.vocab["\u2581Hello"]).toBe(15043);
    expect(model.merges).toHaveLength(61249);
    expect(model.merges.slice(0, 4)).toEqual(["\u2581 t", "e r", "i n", "\u2581 a"]);
    expect((tokenizerJson.added_tokens as { content: string }[]).map((t) => t.content)).toEqual([
      "<unk>",
      "<s>",
      "</s>",
    ]);
  });

  it("survives a JSON round trip unchanged", () => {
    expect(JSON.parse(JSON.stringify(files))).toEqual({ tokenizerJson, tokenizerConfig });
  });
});

describe("LlamaTokenizer on the Llama-2 tokenizer", () => {
  it("encodes known strings to the real Llama-2 ids", () => {
    expect(tok.encode("Hello world!")).toEqual([1, 15043, 3186, 29991]);
    expect(tok.encode("grabbed")).toEqual([1, 2646, 1327, 287]);
    expect(tok.encode("           grabbed")).toEqual([1, 9651, 2646, 1327, 287]);
    expect(tok.encode("\n")).toEqual([1, 29871, 13]);
    expect(tok.encode("ax\n####\nboo")).toEqual([1, 4853, 13, 4136, 13, 833, 29877]);
    expect(tok.encode("🦙")).toEqual([1, 29871, 243, 162, 169, 156]);
    expect(tok.encode("")).toEqual([1]);
    expect(tok.encode("Hello world!", { addSpecialTokens: false })).toEqual([15043, 3186, 29991]);
  });

  const texts = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces\tand\ttabs",
    "   ",
    "line one\nline two\n\n\nline five\r\n",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "café naïve résumé Ångström",
    "日本語のテキストと中文文本",
    "emoji 👋🌍 and 🦙 llama",
    "function add(a: number, b: number): number {\n  return a + b; // sum\n}",
    'JSON: {"key": [1, 2, 3], "nested": {"x": null}}',
    "Ꙋ🦙Ꙋ mixed scripts: Привет, مرحبا, שלום",
  ];

  it.each(texts)("encodes %j exactly like llama-tokenizer-js and decodes it back", (text) => {
    const ids = tok.encode(text);
    expect(ids).toEqual(llamaTokenizerJs.encode(text));
    expect(tok.decode(ids, { skipSpecialTokens: true })).toBe(text);
    expect(tok.decode(ids)).toBe(`<s> ${text}`);
  });

  it("agrees with llama-tokenizer-js on random text", () => {
    const pieces = ["a", "b", "e", "th", " ", "  ", "\n", "\t", "1", "9", ".", ",", "é", "ü", "中", "語", "👋", "🌍"];
    const word = fc.constantFrom("the", "ing", "Hello", "world", "llama", "über", "naïve", "tokens");
    const text = fc
      .array(fc.oneof(fc.constantFrom(...pieces), word), { minLength: 1, maxLength: 30 })
      .map((parts) => parts.join(""));
    fc.assert(
      fc.property(text, (s) => {
        const ids = tok.encode(s);
        expect(ids).toEqual(llamaTokenizerJs.encode(s));
        expect(tok.decode(ids, { skipSpecialTokens: true })).toBe(s);
      }),
      { numRuns: 300 },
    );
  });

  it("exposes special tokens, vocab size and the id <-> token maps", () => {
    expect(tok.bosTokenId).toBe(1);
    expect(tok.eosTokenIds).toEqual([2]);
    expect(tok.addBosToken).toBe(true);
    expect(tok.vocabSize).toBe(32000);
    expect([0, 1, 2, 3, 15043].map((id) => tok.isSpecial(id))).toEqual([true, true, true, false, false]);
    expect(tok.idToToken(15043)).toBe("\u2581Hello");
    expect(tok.tokenToId("\u2581Hello")).toBe(15043);
    expect(tok.idToToken(32000)).toBeUndefined();
    expect(tok.tokenToId("no such token")).toBeUndefined();
  });

  it("decodes special tokens unless told to skip them, and empty input to empty text", () => {
    expect(tok.decode([1, 15043, 2])).toBe("<s> Hello</s>");
    expect(tok.decode([1, 15043, 2], { skipSpecialTokens: true })).toBe("Hello");
    expect(tok.decode([])).toBe("");
    expect(tok.decode([1, 2], { skipSpecialTokens: true })).toBe("");
  });

  it("keeps a byte-order mark that byte-fallback tokens spell out", () => {
    const bom = [0xef, 0xbb, 0xbf].map((b) => 3 + b);
    expect(tok.decode(bom)).toBe("\uFEFF");
    expect(tok.decode([15043, ...bom])).toBe("Hello\uFEFF");
  });
});

describe("tokenText", () => {
  it("gives a token's text as it appears mid-sequence, SentencePiece leading space included", () => {
    const [hello, world] = tok.encode("Hello world", { addSpecialTokens: false });
    expect(tok.tokenText(world)).toBe(" world");
    expect(tok.tokenText(hello)).toBe(" Hello"); // "▁Hello": the space the tokenizer prepends to the text
    const [, ...rest] = tok.encode("x grabbed", { addSpecialTokens: false });
    expect(rest.length).toBeGreaterThan(1); // a word split into pieces: only the first carries the space
    expect(rest.map((id) => tok.tokenText(id)).join("")).toBe(" grabbed");
    expect(tok.tokenText(2)).toBe("</s>");
  });

  it("gives each token's exact UTF-8 bytes, byte-fallback pieces of a character included", () => {
    const ids = tok.encode("a 👋 é", { addSpecialTokens: false });
    const bytes = ids.flatMap((id) => tok.tokenBytes(id));
    expect(new TextDecoder().decode(Uint8Array.from(bytes))).toBe(" a 👋 é");
    expect(tok.tokenBytes(tok.tokenToId("<0xF0>")!)).toEqual([0xf0]);
  });
});

describe("bos handling", () => {
  const fromConfig = (config: Json) => new LlamaTokenizer(tokenizerJson, config);

  it("adds bos once when tokenizer.json's post_processor adds it (Llama-3 style config)", () => {
    const { add_bos_token: _b, add_eos_token: _e, ...rest } = tokenizerConfig;
    const llama3Style = fromConfig({ ...rest, tokenizer_class: "PreTrainedTokenizerFast" });
    expect(llama3Style.addBosToken).toBe(true);
    expect(llama3Style.encode("Hello world!")).toEqual([1, 15043, 3186, 29991]);
    expect(llama3Style.encode("Hello world!", { addSpecialTokens: false })).toEqual([15043, 3186, 29991]);
  });

  it("follows add_bos_token / add_eos_token over the post_processor", () => {
    const noBos = fromConfig({ ...tokenizerConfig, add_bos_token: false });
    expect(noBos.addBosToken).toBe(false);
    expect(noBos.encode("Hello world!")).toEqual([15043, 3186, 29991]);
    const withEos = fromConfig({ ...tokenizerConfig, add_eos_token: true });
    expect(withEos.encode("Hello world!")).toEqual([1, 15043, 3186, 29991, 2]);
  });

  it("reads special tokens given as AddedToken objects", () => {
    const t = fromConfig({
      ...tokenizerConfig,
      bos_token: { __type: "AddedToken", content: "<s>" },
      eos_token: { content: "</s>" },
    });
    expect(t.bosTokenId).toBe(1);
    expect(t.eosTokenIds).toEqual([2]);
  });
});

describe("chat template", () => {
  const conversation: ChatMessage[] = [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: "Hi there!" },
    { role: "assistant", content: "Hello! How can I help?" },
    { role: "user", content: "Tell me a joke." },
  ];
  const rendered =
    "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHi there! [/INST] Hello! How can I help? </s>" +
    "<s>[INST] Tell me a joke. [/INST]";

  it("renders the Llama-2 chat format", () => {
    expect(tok.hasChatTemplate).toBe(true);
    expect(tok.applyChatTemplate(conversation)).toBe(rendered);
    // The generation prompt is implicit in "[/INST]".
    expect(tok.applyChatTemplate(conversation, { addGenerationPrompt: false })).toBe(rendered);
    expect(tok.applyChatTemplate([{ role: "user", content: "  Hi  " }])).toBe("<s>[INST] Hi [/INST]");
  });

  it("encodes the rendered chat with exactly one bos per turn", () => {
    expect(tok.encodeChat([{ role: "user", content: "Hi" }])).toEqual([
      1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962,
    ]);
    const ids = tok.encodeChat(conversation);
    expect(ids).toEqual(tok.encode(rendered, { addSpecialTokens: false }));
    expect(ids.slice(0, 2)).toEqual([1, 518]);
    expect(ids.filter((id) => id === 1)).toHaveLength(2);
    expect(ids.filter((id) => id === 2)).toHaveLength(1);
  });

  it("rejects roles that do not alternate", () => {
    const bad: ChatMessage[] = [
      { role: "user", content: "a" },
      { role: "user", content: "b" },
    ];
    expect(() => tok.applyChatTemplate(bad)).toThrow(ChatTemplateError);
    expect(() => tok.applyChatTemplate(bad)).toThrow(/alternate/);
  });

  it("throws ChatTemplateError for a model without a template", () => {
    const { chat_template: _t, ...rest } = tokenizerConfig;
    const plain = new LlamaTokenizer(tokenizerJson, rest);
    expect(plain.hasChatTemplate).toBe(false);
    expect(() => plain.encodeChat([{ role: "user", content: "Hi" }])).toThrow(ChatTemplateError);
    expect(() => plain.applyChatTemplate([{ role: "user", content: "Hi" }])).toThrow(
      "model has no chat_template in tokenizer_config.json; use the completions API",
    );
  });
});

describe("fromDir errors", () => {
  it("names a missing file", () => {
    const d = modelDir({ "tokenizer.json": tokenizerJson });
    expect(() => LlamaTokenizer.fromDir(d)).toThrow(ModelLoadError);
    expect(() => LlamaTokenizer.fromDir(d)).toThrow(/tokenizer_config\.json: file not found/);
    const d2 = modelDir({ "tokenizer_config.json": tokenizerConfig });
    expect(() => LlamaTokenizer.fromDir(d2)).toThrow(/tokenizer\.json: file not found/);
  });

  it("names a file with invalid contents", () => {
    const badJson = modelDir({ "tokenizer.json": "{not json", "tokenizer_config.json": tokenizerConfig });
    expect(() => LlamaTokenizer.fromDir(badJson)).toThrow(/tokenizer\.json: invalid JSON/);
    const noModel = modelDir({ "tokenizer.json": { version: "1.0" }, "tokenizer_config.json": tokenizerConfig });
    expect(() => LlamaTokenizer.fromDir(noModel)).toThrow(ModelLoadError);
    const badTemplate = modelDir({
      "tokenizer.json": tokenizerJson,
      "tokenizer_config.json": { ...tokenizerConfig, chat_template: "{% if %}" },
    });
    expect(() => LlamaTokenizer.fromDir(badTemplate)).toThrow(/tokenizer_config\.json: chat_template does not parse/);
  });
});
