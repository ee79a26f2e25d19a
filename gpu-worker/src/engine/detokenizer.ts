/**
 * Streaming token -> text. The text of the generated tokens is decode(prompt + generated) minus decode(prompt),
 * which is what gets SentencePiece's leading space right (" world" after "Hello", but "Hello" right after bos).
 * It is computed incrementally over a small window, vLLM/TGI's prefix_offset/read_offset technique, so a step
 * never re-decodes the whole sequence.
 *
 * @module
 */
import type { LlamaTokenizer } from "../tokenizer/tokenizer.ts";

/** What the detokenizer needs from a tokenizer. */
export type DetokenizerTokenizer = Pick<LlamaTokenizer, "decode" | "isSpecial">;

/** Prompt tokens kept as left context: enough for a decoder's view of the first generated token. */
const PROMPT_CONTEXT_TOKENS = 5;
const REPLACEMENT_CHAR = "\uFFFD";

/**
 * NOTE: the window `tokens` holds the last emitted token(s) as left context (their text is `prefixText`), then
 * the tokens not yet emitted (from `readOffset`). After a new token the window's text minus `prefixText` is the
 * delta. It is held back while the window text ends in U+FFFD (a character whose remaining byte-fallback tokens
 * are still to come): the decoder is then mid-character, and once it is not, text decoded from the window's start
 * extends exactly as the full decode does, so the deltas concatenate to the full text. The window is emitted
 * context plus held tokens, so a step costs O(1) unless a character stays incomplete.
 *
 * Special tokens are dropped on entry: they are never emitted (skip_special_tokens), and a skipped special token
 * contributes to the full decode nothing but the joining of its neighbours, which dropping reproduces.
 *
 * @example
 * const detok = new IncrementalDetokenizer(tokenizer, promptIds);
 * for (const id of generated) stream.write(detok.push(id));
 * stream.write(detok.flush());
 */
export class IncrementalDetokenizer {
  /** Non-special tokens: context (already emitted, or the prompt's tail), then the held ones. */
  private tokens: number[];
  /** Where the tokens not yet emitted start in `tokens`. */
  private readOffset: number;
  /** decode(tokens[0:readOffset]). */
  private prefixText: string;

  constructor(
    private readonly tokenizer: DetokenizerTokenizer,
    promptTokenIds: readonly number[],
  ) {
    const prompt = promptTokenIds.filter((id) => !tokenizer.isSpecial(id));
    this.tokens = prompt.slice(-PROMPT_CONTEXT_TOKENS);
    this.readOffset = this.tokens.length;
    this.prefixText = this.decode(this.tokens);
  }

  /** Add one generated token; returns the text it completes, possibly "". */
  push(tokenId: number): string {
    if (this.tokenizer.isSpecial(tokenId)) return "";
    this.tokens.push(tokenId);
    const text = this.decode(this.tokens);
    if (text.length <= this.prefixText.length || text.endsWith(REPLACEMENT_CHAR)) return "";
    return this.advance(text);
  }

  /** The text still held back (an incomplete character at the very end comes out as U+FFFD). */
  flush(): string {
    const text = this.decode(this.tokens);
    if (text.length <= this.prefixText.length) return "";
    return this.advance(text);
  }

  /** Emit the window's new text; the tokens just emitted become the next window's context. */
  private advance(windowText: string): string {
    const delta = windowText.slice(this.prefixText.length);
    this.tokens = this.tokens.slice(this.readOffset);
    this.readOffset = this.tokens.length;
    this.prefixText = this.decode(this.tokens);
    return delta;
  }

  private decode(ids: readonly number[]): string {
    return this.tokenizer.decode(ids, { cleanUpTokenizationSpaces: false });
  }
}
