// XGrammar behind GrammarCache/SequenceGrammar on the real Llama-2 tokenizer: masks, completion, the cache, and
// schemas XGrammar cannot handle (which abort its WebAssembly) failing alone without harming later requests.
import { beforeAll, describe, expect, it } from "vitest";
import { ensureDefaultModel } from "../model/default-model.ts";
import { LlamaTokenizer } from "../tokenizer/tokenizer.ts";
import { GrammarCache, GrammarError, type GrammarSpec, type SequenceGrammar } from "./grammar.ts";

const EOS = 2;
let tok: LlamaTokenizer;
let cache: GrammarCache;

beforeAll(async () => {
  tok = LlamaTokenizer.fromDir(await ensureDefaultModel());
  cache = GrammarCache.for(tok, 32000, [EOS]);
  await cache.warmUp();
}, 120_000);

const allowed = (mask: Int32Array, id: number) => ((mask[id >> 5] >>> (id & 31)) & 1) === 1;

/** Feeds `text`'s tokens (as they would follow a prompt: no leading-space piece) and returns whether all were accepted. */
function feed(m: SequenceGrammar, text: string): boolean {
  // Encoding "a" + text and dropping "a"'s piece gives the mid-sequence tokens of text.
  const ids = tok.encode(`a${text}`, { addSpecialTokens: false }).slice(1);
  return ids.every((id) => m.accept(id));
}

describe("GrammarCache", () => {
  const person: GrammarSpec = {
    type: "json_schema",
    schema: {
      type: "object",
      properties: { name: { type: "string", maxLength: 6 }, age: { type: "integer", minimum: 0, maximum: 99 } },
      required: ["name", "age"],
    },
  };

  it("masks to the schema, allows only eos once complete, and terminates on it", async () => {
    const m = await cache.matcher(person);
    const first = await m.nextTokenBitmask();
    expect(allowed(first, tok.tokenToId("{")!)).toBe(true);
    expect(allowed(first, tok.tokenToId("▁{")!)).toBe(false); // compact JSON: no leading space
    expect(allowed(first, EOS)).toBe(false);
    expect(feed(m, '{"name": "Ann", "age": 42}')).toBe(true);
    const done = await m.nextTokenBitmask();
    const open = Array.from({ length: 32000 }, (_, id) => id).filter((id) => allowed(done, id));
    expect(open).toEqual([EOS]);
    expect(m.isTerminated).toBe(false);
    expect(m.accept(EOS)).toBe(true);
    expect(m.isTerminated).toBe(true);
    m.dispose();
  });

  it("rejects a token the grammar does not allow and keeps its state", async () => {
    const m = await cache.matcher(person);
    expect(feed(m, '{"name": "A')).toBe(true);
    expect(m.accept(tok.tokenToId("}")!)).toBe(true); // "}" is text inside a string
    expect(feed(m, '", "age": 1')).toBe(true);
    expect(m.accept(tok.tokenToId("a")!)).toBe(false); // not after an integer
    expect(feed(m, "}")).toBe(true);
    m.dispose();
  });

  it("never allows special tokens (bos, unk) as text, even inside a string", async () => {
    const m = await cache.matcher(person);
    expect(feed(m, '{"name": "')).toBe(true);
    const mask = await m.nextTokenBitmask();
    expect(allowed(mask, tok.tokenToId("▁cat")!)).toBe(true);
    expect([0, 1, EOS].map((id) => allowed(mask, id))).toEqual([false, false, false]);
    m.dispose();
  });

  it("json_object allows any object with any keys", async () => {
    const m = await cache.matcher({ type: "json_object" });
    expect(feed(m, '{"anything": [1, {"x": null}], "b": "c"}')).toBe(true);
    expect(m.accept(EOS) && m.isTerminated).toBe(true);
    const n = await cache.matcher({ type: "json_object" });
    expect(n.accept(tok.tokenToId("[")!)).toBe(false);
  });

  it("repeats a schema with a separator", async () => {
    const m = await cache.matcher({ ...person, separator: "; " });
    expect(feed(m, '{"name": "A", "age": 1}; {"name": "B", "age": 2}')).toBe(true);
    expect(m.accept(EOS) && m.isTerminated).toBe(true);
  });

  it("compiles a schema once per tokenizer", async () => {
    const spec: GrammarSpec = {
      type: "json_schema",
      schema: { type: "array", items: { type: "boolean" }, maxItems: 3 },
    };
    const before = { hits: cache.hits, misses: cache.misses };
    await (await cache.matcher(spec)).dispose();
    await (await cache.matcher(spec)).dispose();
    expect(GrammarCache.for(tok, 32000, [EOS])).toBe(cache);
    expect(cache.misses - before.misses).toBe(1);
    expect(cache.hits - before.hits).toBe(1);
  });

  it("fails a schema XGrammar cannot handle with its reason, and keeps serving (many times over)", async () => {
    const bad: [unknown, RegExp][] = [
      [{ type: "string", pattern: "(?=a)b" }, /Lookahead is not supported/],
      [{ type: "integer", minimum: 5, maximum: 1 }, /minimum greater than maximum/],
      [{ type: "wizard" }, /Unsupported type "wizard"/],
      [{ $ref: "#/definitions/nope" }, /definitions/],
    ];
    for (let round = 0; round < 10; round++) {
      for (const [schema, reason] of bad) {
        const err = await cache
          .matcher({ type: "json_schema", schema: schema as Record<string, unknown> })
          .catch((e) => e);
        expect(err).toBeInstanceOf(GrammarError);
        expect((err as Error).message).toMatch(reason);
      }
    }
    // XGrammar's compiling instance never saw those schemas: it still works.
    const m = await cache.matcher(person);
    expect(feed(m, '{"name": "Zoe", "age": 7}')).toBe(true);
    m.dispose();
  }, 300_000);
});
