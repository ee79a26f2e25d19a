/**
 * Constrained decoding with XGrammar: a request's grammar (a JSON schema, any JSON object) is compiled once per
 * tokenizer and cached; each constrained sequence gets a matcher that yields the bitmask of the tokens allowed next
 * (the sampler applies it, see sampler.ts) and advances on every token the sequence accepts.
 *
 * JSON comes out compact, on one line, with `", "` and `": "` separators (what Python's json.dumps writes, and what
 * Llama 3.1's tool calls look like): with free whitespace a model can emit newlines forever inside valid JSON.
 * Schemas are compiled in XGrammar's strict mode, as vLLM does: properties and items the schema does not list are
 * not generated, so every output validates against the schema as given.
 *
 * NOTE on failures: XGrammar's WebAssembly build aborts on a schema it cannot convert (an unsupported keyword, a
 * regex with lookahead, minimum > maximum) instead of throwing, and an aborted instance hangs after a few aborts.
 * So client schemas are first converted to EBNF in a separate, disposable instance (`SchemaConverter`); the
 * instance that compiles and matches only ever parses EBNF that XGrammar itself wrote. The converter's error text
 * (printed by XGrammar, caught on its way to stderr) becomes the client's 400.
 *
 * @module
 */
import { createHash } from "node:crypto";
import type { LlamaTokenizer } from "../tokenizer/tokenizer.ts";
import {
  type CompiledGrammar,
  type GrammarCompiler,
  type GrammarMatcher,
  loadXGrammar,
  type XGrammarModule,
} from "./xgrammar.ts";

export type JsonSchema = Record<string, unknown> | boolean;

/** What a sequence's output must match. */
export type GrammarSpec =
  /** Any JSON object (OpenAI's JSON mode). */
  | { type: "json_object" }
  /**
   * A JSON value matching `schema`; with `separator`, one or more such values joined by it (parallel tool calls
   * written as `{...}; {...}`).
   */
  | { type: "json_schema"; schema: JsonSchema; separator?: string };

/** A grammar XGrammar cannot build (the request's fault); `param` names the request field when known. */
export class GrammarError extends Error {
  override name = "GrammarError";
  constructor(
    message: string,
    readonly param: string | null = null,
  ) {
    super(message);
  }
}

/** Compiled grammars kept per tokenizer (least recently used ones are dropped beyond this). */
const MAX_CACHED_GRAMMARS = 128;

// ---------------------------------------------------------------------------------------------------------------
// Untrusted schemas -> EBNF, in an instance that may abort

/** XGrammar prints "[FATAL] <file>:<line>: <message>" before aborting; the message is what the client needs. */
const FATAL_LINE = /\[FATAL\][^:]*:\d+:\s*(.*)/;

class SchemaConverter {
  #xg: Promise<XGrammarModule> | null = null;
  /** XGrammar's stderr lines while a conversion runs. */
  #captured: string[] | null = null;

  /**
   * Binds the new instance's stderr to `#captured`: Emscripten binds `console.error` once, while the instance
   * initialises, so it is swapped for a forwarding function just for that time.
   */
  async #instance(): Promise<XGrammarModule> {
    this.#xg ??= (async () => {
      const xg = loadXGrammar();
      const original = console.error;
      console.error = (...args: unknown[]) => {
        if (this.#captured) this.#captured.push(args.map(String).join(" "));
        else original(...args);
      };
      try {
        await xg.Grammar.builtinJSONGrammar(); // the first call initialises the instance
      } finally {
        console.error = original;
      }
      return xg;
    })();
    return this.#xg;
  }

  /** The EBNF of `schema` as XGrammar converts it; throws GrammarError with XGrammar's reason. */
  async toEbnf(schema: string, strict: boolean): Promise<string> {
    const xg = await this.#instance();
    this.#captured = [];
    try {
      const grammar = await xg.Grammar.fromJSONSchema(schema, false, -1, undefined, strict);
      const ebnf = grammar.toString();
      grammar.dispose();
      return ebnf;
    } catch (e) {
      this.#xg = null; // aborted: never call into this instance again
      const reason = this.#captured.map((l) => FATAL_LINE.exec(l)?.[1]).find(Boolean);
      throw new GrammarError(`the JSON schema cannot be used for constrained decoding: ${reason ?? String(e)}`);
    } finally {
      this.#captured = null;
    }
  }
}

const converter = new SchemaConverter();

// ---------------------------------------------------------------------------------------------------------------
// Compiling and caching, per tokenizer

/** The vocabulary as XGrammar needs it: each token's raw piece (special tokens as "", which it never allows). */
function xgrammarVocab(tokenizer: LlamaTokenizer): string[] {
  const vocab: string[] = [];
  for (let id = 0; id < tokenizer.vocabSize; id++) {
    vocab.push(tokenizer.isSpecial(id) ? "" : (tokenizer.idToToken(id) ?? ""));
  }
  return vocab;
}

/** Names the grammar's top rule so that `root` can repeat it with a separator. */
function repeated(ebnf: string, separator: string): string {
  return `${ebnf.replace(/^root ::=/m, "value ::=")}\nroot ::= value (${JSON.stringify(separator)} value)*\n`;
}

/** A compiled grammar with the instance it lives in (a grammar can only be matched by its own instance). */
interface Compiled {
  xg: XGrammarModule;
  grammar: CompiledGrammar;
}

/**
 * One tokenizer's compiler and its cache of compiled grammars. Shared by every engine of the process that uses the
 * same vocabulary (the key covers the vocabulary, its decoding and the stop tokens).
 */
export class GrammarCache {
  static readonly #byTokenizer = new Map<string, GrammarCache>();

  /** Compiled grammars by spec (JSON text), least recently used first. */
  readonly #compiled = new Map<string, Promise<Compiled>>();
  #compiler: Promise<{ xg: XGrammarModule; compiler: GrammarCompiler }> | null = null;
  /** Compilations served from the cache, and compiled anew. */
  hits = 0;
  misses = 0;

  private constructor(
    private readonly vocab: string[],
    private readonly decoding: LlamaTokenizer["decoding"],
    private readonly vocabSize: number,
    readonly stopTokenIds: number[],
  ) {}

  /**
   * @param vocabSize the model's logits size (may exceed the tokenizer's: padded embeddings)
   * @param stopTokenIds the tokens that end a sequence; a completed grammar allows only these
   */
  static for(tokenizer: LlamaTokenizer, vocabSize: number, stopTokenIds: number[]): GrammarCache {
    const vocab = xgrammarVocab(tokenizer);
    const key = createHash("sha256")
      .update(JSON.stringify([tokenizer.decoding, vocabSize, stopTokenIds]))
      .update(vocab.join("\u0000"))
      .digest("hex");
    let cache = GrammarCache.#byTokenizer.get(key);
    if (!cache) {
      cache = new GrammarCache(vocab, tokenizer.decoding, vocabSize, [...stopTokenIds]);
      GrammarCache.#byTokenizer.set(key, cache);
    }
    return cache;
  }

  /** Loads XGrammar and preprocesses the vocabulary (a few hundred ms for 32k tokens), once. */
  async warmUp(): Promise<void> {
    await this.#getCompiler();
  }

  #getCompiler(): Promise<{ xg: XGrammarModule; compiler: GrammarCompiler }> {
    this.#compiler ??= (async () => {
      const xg = loadXGrammar();
      const { vocabType, addPrefixSpace } = this.decoding;
      const info = await xg.TokenizerInfo.createTokenizerInfo(
        this.vocab,
        vocabType,
        addPrefixSpace,
        this.vocabSize,
        this.stopTokenIds,
      );
      // XGrammar's own cache is off: ours is bounded and keyed the same way (spec text, this tokenizer).
      return { xg, compiler: await xg.GrammarCompiler.createGrammarCompiler(info, false) };
    })();
    return this.#compiler;
  }

  /** The compiled grammar of `spec`, from the cache when it was compiled before. */
  compile(spec: GrammarSpec): Promise<Compiled> {
    const key = JSON.stringify(spec);
    const cached = this.#compiled.get(key);
    if (cached) {
      this.hits++;
      this.#compiled.delete(key); // re-inserted last: most recently used
      this.#compiled.set(key, cached);
      return cached;
    }
    this.misses++;
    const compiled = this.#compileUncached(spec);
    this.#compiled.set(key, compiled);
    compiled.catch(() => this.#compiled.delete(key));
    while (this.#compiled.size > MAX_CACHED_GRAMMARS) {
      const [oldest, evicted] = this.#compiled.entries().next().value!;
      this.#compiled.delete(oldest);
      // Matchers hold their own reference to the compiled grammar, so running sequences are unaffected.
      evicted.then((c) => c.grammar.dispose()).catch(() => {});
    }
    return compiled;
  }

  async #compileUncached(spec: GrammarSpec): Promise<Compiled> {
    const { xg, compiler } = await this.#getCompiler();
    if (spec.type === "json_object") {
      const grammar = await compiler.compileJSONSchema(JSON.stringify({ type: "object" }), false, -1, undefined, false);
      return { xg, grammar };
    }
    let ebnf = await converter.toEbnf(JSON.stringify(spec.schema), true);
    if (spec.separator !== undefined) ebnf = repeated(ebnf, spec.separator);
    try {
      return { xg, grammar: await compiler.compileGrammar(ebnf) };
    } catch (e) {
      // XGrammar rejected EBNF it wrote itself: this instance aborted and must not be used again.
      this.#compiler = null;
      this.#compiled.clear();
      throw new Error(`XGrammar failed to compile a converted schema: ${(e as Error).message}`);
    }
  }

  /** A matcher for one sequence, at the grammar's start. */
  async matcher(spec: GrammarSpec): Promise<SequenceGrammar> {
    const { xg, grammar } = await this.compile(spec);
    return new SequenceGrammar(await xg.GrammarMatcher.createGrammarMatcher(grammar, this.stopTokenIds));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// One sequence

/**
 * One sequence's position in its grammar. The engine asks for the next bitmask before each sample and calls
 * `accept` with every token appended to the output, so the state always matches the output tokens; preemption
 * recomputes KV but never changes output tokens, so the matcher needs no rollback.
 */
export class SequenceGrammar {
  #disposed = false;

  constructor(private readonly matcher: GrammarMatcher) {}

  /** Bit `id % 32` of word `id >> 5` is set iff token `id` may come next. */
  nextTokenBitmask(): Promise<Int32Array> {
    return this.matcher.getNextTokenBitmask();
  }

  /** Advances by one token; false if the grammar does not allow it here (then the state is unchanged). */
  accept(tokenId: number): boolean {
    return this.matcher.acceptToken(tokenId);
  }

  /** True once the grammar completed and a stop token was accepted. */
  get isTerminated(): boolean {
    return this.matcher.isTerminated();
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.matcher.dispose();
  }
}
