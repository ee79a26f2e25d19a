/**
 * The model's tokenizer: `tokenizer.json` run by `@huggingface/tokenizers`, with the special-token and chat-template
 * rules of `tokenizer_config.json` applied the way `transformers` applies them, so a prompt becomes the same ids
 * here as in `tokenizer(text)` / `apply_chat_template(...)`.
 *
 * @module
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Template, tokenize } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";
import { ModelLoadError } from "../model/errors.ts";

/** A function call the assistant made; `arguments` is JSON text, as OpenAI writes it. */
export interface ChatToolCall {
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

/** A conversation turn, with OpenAI's tool-calling fields (Hugging Face templates read the same names). */
export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool";
  /** null only for an assistant turn that made tool calls. */
  content: string | null;
  tool_calls?: ChatToolCall[];
  tool_call_id?: string;
}

/** A function the model may call, as OpenAI and transformers' `apply_chat_template(tools=...)` describe it. */
export interface ChatTool {
  type: "function";
  function: { name: string; description?: string; parameters?: unknown };
}

/**
 * A chat request the model cannot serve: no template, no tool support, or the template rejected the messages.
 * `param` names the request field at fault.
 */
export class ChatTemplateError extends Error {
  override name = "ChatTemplateError";
  constructor(
    message: string,
    readonly param: string = "messages",
  ) {
    super(message);
  }
}

type Json = Record<string, unknown>;

/**
 * The part of `@huggingface/tokenizers`' Tokenizer used here, typed locally: the package's bundled .d.ts
 * re-exports do not resolve under NodeNext, which would leave the class untyped.
 */
interface HfTokenizer {
  encode(text: string, opts: { add_special_tokens: boolean }): { ids: number[] };
  decode(ids: number[], opts: { clean_up_tokenization_spaces: boolean }): string;
  token_to_id(token: string): number | undefined;
  id_to_token(id: number): string | undefined;
  get_vocab(withAddedTokens: boolean): Map<string, number>;
  get_added_tokens_decoder(): Map<number, { special: boolean }>;
  decoder: DecoderNode | null;
}

/** A decoder of the pipeline, seen only as far as `keepByteOrderMarks` walks it. */
interface DecoderNode {
  config?: { type?: string };
  decoders?: DecoderNode[];
  text_decoder?: TextDecoder;
}

/** transformers' `LlamaTokenizer(Fast)` rebuilds bos/eos handling from add_bos_token/add_eos_token itself. */
const LLAMA_TOKENIZER_CLASS = /^(Code)?LlamaTokenizer(Fast)?$/;

const isObject = (v: unknown): v is Json => typeof v === "object" && v !== null && !Array.isArray(v);

function readJsonObject(file: string): Json {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ModelLoadError(file, code === "ENOENT" ? "file not found" : `cannot read: ${(err as Error).message}`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new ModelLoadError(file, `invalid JSON: ${(err as Error).message}`);
  }
  if (!isObject(parsed)) throw new ModelLoadError(file, "must contain a JSON object");
  return parsed;
}

/** A special token in tokenizer_config.json is a string or an AddedToken object `{ content, ... }`. */
function tokenContent(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (isObject(v) && typeof v.content === "string") return v.content;
  return null;
}

/** `chat_template` is a string, or a list of named templates of which "default" is the one to use. */
function chatTemplateSource(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (Array.isArray(v)) {
    const entry = v.find((t) => isObject(t) && t.name === "default");
    if (isObject(entry) && typeof entry.template === "string") return entry.template;
  }
  return null;
}

/**
 * The JS ByteFallback decoder uses a TextDecoder that drops a BOM at the start of every byte run; the Rust
 * decoder keeps it. Keeping it also makes the text of a byte run independent of where the run is cut, which
 * incremental detokenization relies on.
 */
function keepByteOrderMarks(decoder: DecoderNode | null): void {
  if (decoder === null) return;
  if (decoder.config?.type === "ByteFallback") decoder.text_decoder = new TextDecoder("utf-8", { ignoreBOM: true });
  decoder.decoders?.forEach(keepByteOrderMarks);
}

/**
 * @example
 * const tok = LlamaTokenizer.fromDir("/models/llama-2-7b-chat");
 * tok.encode("Hello world!"); // [1, 15043, 3186, 29991]
 * tok.encodeChat([{ role: "user", content: "Hi" }]); // [1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962]
 */
export class LlamaTokenizer {
  readonly bosTokenId: number | null;
  readonly eosTokenIds: number[];
  /** Whether `encode(text)` starts with bos (from add_bos_token, or from tokenizer.json's post_processor). */
  readonly addBosToken: boolean;
  readonly vocabSize: number;
  readonly hasChatTemplate: boolean;
  /** Whether the chat template reads `tools` (renders function definitions), as tool-calling templates do. */
  readonly supportsTools: boolean;
  /**
   * How token pieces spell text, in XGrammar's terms: SentencePiece with byte fallback (Llama 2, "▁" for space,
   * `<0xNN>` bytes), byte-level BPE (Llama 3, GPT-2's byte alphabet) or raw; and whether encoding prepends a space.
   */
  readonly decoding: { vocabType: "byte_fallback" | "byte_level" | "raw"; addPrefixSpace: boolean };

  private readonly hf: HfTokenizer;
  private readonly bosToken: string | null;
  private readonly eosToken: string | null;
  /**
   * Whether this class adds bos/eos itself (encoding with the post_processor off), as transformers does for Llama
   * tokenizer classes and explicit add_*_token flags; otherwise the post_processor decides (Llama 3).
   */
  private readonly managesSpecialTokens: boolean;
  private readonly addEosToken: boolean;
  private readonly specialIds: Set<number>;
  private readonly cleanUpTokenizationSpaces: boolean;
  private readonly chatTemplate: Template | null;

  /** Load `tokenizer.json` and `tokenizer_config.json` from a model directory. */
  static fromDir(dir: string): LlamaTokenizer {
    const tokenizerFile = join(dir, "tokenizer.json");
    const configFile = join(dir, "tokenizer_config.json");
    return new LlamaTokenizer(readJsonObject(tokenizerFile), readJsonObject(configFile), tokenizerFile, configFile);
  }

  /** From already-parsed files; the file names only label errors. */
  constructor(
    tokenizerJson: object,
    tokenizerConfig: object,
    tokenizerFile = "tokenizer.json",
    configFile = "tokenizer_config.json",
  ) {
    if (!isObject(tokenizerJson) || !isObject(tokenizerJson.model)) {
      throw new ModelLoadError(tokenizerFile, 'must be a Hugging Face tokenizers file with a "model" object');
    }
    if (!isObject(tokenizerConfig)) throw new ModelLoadError(configFile, "must contain a JSON object");
    const config = tokenizerConfig;
    try {
      this.hf = new Tokenizer(tokenizerJson, config) as HfTokenizer;
    } catch (err) {
      throw new ModelLoadError(tokenizerFile, `unsupported tokenizer: ${(err as Error).message}`);
    }
    keepByteOrderMarks(this.hf.decoder);
    this.byteLevel = hasStep(tokenizerJson.decoder, "decoders", "ByteLevel");
    this.decoding = {
      vocabType: this.byteLevel
        ? "byte_level"
        : hasStep(tokenizerJson.decoder, "decoders", "ByteFallback")
          ? "byte_fallback"
          : "raw",
      addPrefixSpace: prependsSpace(tokenizerJson),
    };

    let maxId = -1;
    for (const id of this.hf.get_vocab(true).values()) maxId = Math.max(maxId, id);
    this.vocabSize = maxId + 1;
    this.bosToken = tokenContent(config.bos_token);
    this.eosToken = tokenContent(config.eos_token);
    this.bosTokenId = this.bosToken === null ? null : (this.hf.token_to_id(this.bosToken) ?? null);
    const eosId = this.eosToken === null ? undefined : this.hf.token_to_id(this.eosToken);
    this.eosTokenIds = eosId === undefined ? [] : [eosId];

    this.specialIds = new Set([...this.hf.get_added_tokens_decoder()].filter(([, t]) => t.special).map(([id]) => id));
    const extra = Array.isArray(config.additional_special_tokens) ? config.additional_special_tokens : [];
    for (const content of extra.map(tokenContent)) {
      const id = content === null ? undefined : this.hf.token_to_id(content);
      if (id !== undefined) this.specialIds.add(id);
    }

    const llamaClass = typeof config.tokenizer_class === "string" && LLAMA_TOKENIZER_CLASS.test(config.tokenizer_class);
    const explicitBos = typeof config.add_bos_token === "boolean" ? config.add_bos_token : null;
    const explicitEos = typeof config.add_eos_token === "boolean" ? config.add_eos_token : null;
    this.managesSpecialTokens = llamaClass || explicitBos !== null || explicitEos !== null;
    const postProcessed = this.hf.encode("", { add_special_tokens: true }).ids;
    const postProcessorAddsBos = this.bosTokenId !== null && postProcessed[0] === this.bosTokenId;
    const postProcessorAddsEos = eosId !== undefined && postProcessed.at(-1) === eosId;
    this.addBosToken = (explicitBos ?? (llamaClass || postProcessorAddsBos)) && this.bosTokenId !== null;
    this.addEosToken = (explicitEos ?? (!llamaClass && postProcessorAddsEos)) && eosId !== undefined;
    // transformers' historical default is true, but Llama checkpoints set false and streaming never cleans up.
    this.cleanUpTokenizationSpaces = config.clean_up_tokenization_spaces === true;

    const templateSource = chatTemplateSource(config.chat_template);
    try {
      this.chatTemplate = templateSource === null ? null : new Template(templateSource);
    } catch (err) {
      throw new ModelLoadError(configFile, `chat_template does not parse: ${(err as Error).message}`);
    }
    this.hasChatTemplate = this.chatTemplate !== null;
    this.supportsTools =
      templateSource !== null &&
      // typed locally: the package's .d.ts re-exports (extensionless) do not resolve under NodeNext
      (tokenize(templateSource) as { type: string; value: string }[]).some(
        (t) => t.type === "Identifier" && t.value === "tools",
      );
  }

  /** Text to ids; with special tokens (the default) the result equals transformers' `tokenizer(text).input_ids`. */
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[] {
    const addSpecialTokens = opts?.addSpecialTokens ?? true;
    if (!this.managesSpecialTokens) return this.hf.encode(text, { add_special_tokens: addSpecialTokens }).ids;
    const ids = this.hf.encode(text, { add_special_tokens: false }).ids;
    if (!addSpecialTokens) return ids;
    if (this.addBosToken) ids.unshift(this.bosTokenId!);
    if (this.addEosToken) ids.push(this.eosTokenIds[0]);
    return ids;
  }

  /**
   * Ids to text. `cleanUpTokenizationSpaces` defaults to tokenizer_config's flag (false when absent), the
   * incremental detokenizer always turns it off.
   */
  decode(ids: readonly number[], opts?: { skipSpecialTokens?: boolean; cleanUpTokenizationSpaces?: boolean }): string {
    const kept = opts?.skipSpecialTokens ? ids.filter((id) => !this.specialIds.has(id)) : [...ids];
    if (kept.length === 0) return "";
    return this.hf.decode(kept, {
      clean_up_tokenization_spaces: opts?.cleanUpTokenizationSpaces ?? this.cleanUpTokenizationSpaces,
    });
  }

  idToToken(id: number): string | undefined {
    return this.hf.id_to_token(id);
  }

  /**
   * The text one token contributes in the middle of a sequence, as OpenAI's logprobs show it (" choose", not
   * "choose"): decoding a token alone would drop SentencePiece's leading space. Decoded after an anchor token
   * and cut; a byte-fallback piece of a longer character comes out as U+FFFD (its bytes say the rest).
   */
  tokenText(id: number): string {
    let text = this.tokenTextCache.get(id);
    if (text === undefined) {
      if (this.specialIds.has(id)) text = this.decode([id]);
      else {
        const anchor = this.anchorIds();
        const prefix = this.decode(anchor, { cleanUpTokenizationSpaces: false });
        const full = this.decode([...anchor, id], { cleanUpTokenizationSpaces: false });
        text = full.startsWith(prefix) ? full.slice(prefix.length) : this.decode([id]);
      }
      this.tokenTextCache.set(id, text);
    }
    return text;
  }

  /**
   * The UTF-8 bytes one token stands for, as OpenAI's logprobs `bytes` field gives them: exact also for a piece of
   * a character (SentencePiece byte-fallback `<0xE2>`, or a byte-level BPE token holding half an emoji), whose
   * text alone would be U+FFFD.
   */
  tokenBytes(id: number): number[] {
    const piece = this.idToToken(id);
    if (piece !== undefined && !this.specialIds.has(id)) {
      const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
      if (byte) return [Number.parseInt(byte[1], 16)];
      if (this.byteLevel) {
        const bytes = [...piece].map((ch) => BYTE_LEVEL_DECODE.get(ch));
        if (bytes.every((b) => b !== undefined)) return bytes as number[];
      }
    }
    return [...new TextEncoder().encode(this.tokenText(id))];
  }

  private readonly byteLevel: boolean;
  private readonly tokenTextCache = new Map<number, string>();
  private anchor: number[] | null = null;
  private anchorIds(): number[] {
    this.anchor ??= this.encode("a", { addSpecialTokens: false });
    return this.anchor;
  }

  tokenToId(token: string): number | undefined {
    return this.hf.token_to_id(token);
  }

  /** Special tokens (bos, eos, chat markers) are control symbols, never emitted as text. */
  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  /**
   * Render the conversation as the model's prompt text with tokenizer_config's `chat_template`. Messages and
   * `tools` reach the template as transformers passes them; tool-call arguments are parsed from JSON text into
   * objects first (templates write `arguments | tojson`), as vLLM does.
   */
  applyChatTemplate(
    messages: readonly ChatMessage[],
    opts?: { addGenerationPrompt?: boolean; tools?: readonly ChatTool[] },
  ): string {
    if (this.chatTemplate === null) {
      throw new ChatTemplateError("model has no chat_template in tokenizer_config.json; use the completions API");
    }
    const usesTools = messages.some((m) => m.role === "tool" || m.tool_calls !== undefined);
    if ((opts?.tools?.length || usesTools) && !this.supportsTools) {
      throw new ChatTemplateError(
        "this model's chat template does not support tools (tool definitions, tool calls or tool results)",
        opts?.tools?.length ? "tools" : "messages",
      );
    }
    const context: Record<string, unknown> = {
      messages: messages.map(templateMessage),
      add_generation_prompt: opts?.addGenerationPrompt ?? true,
      bos_token: this.bosToken ?? "",
      eos_token: this.eosToken ?? "",
    };
    if (opts?.tools?.length) context.tools = opts.tools;
    try {
      return this.chatTemplate.render(context);
    } catch (err) {
      // raise_exception() in a template (e.g. roles that do not alternate) lands here too.
      throw new ChatTemplateError(`chat_template rejected the messages: ${(err as Error).message}`);
    }
  }

  /**
   * Render and encode a conversation. Templates write bos themselves, so the text is encoded without special
   * tokens, as vLLM and transformers' `apply_chat_template(tokenize=True)` do; bos never appears twice.
   */
  encodeChat(
    messages: readonly ChatMessage[],
    opts?: { addGenerationPrompt?: boolean; tools?: readonly ChatTool[] },
  ): number[] {
    return this.encode(this.applyChatTemplate(messages, opts), { addSpecialTokens: false });
  }
}

/** A message as chat templates read it: only the fields that are set, tool-call arguments as objects. */
function templateMessage(m: ChatMessage, i: number): Record<string, unknown> {
  const out: Record<string, unknown> = { role: m.role, content: m.content };
  if (m.tool_call_id !== undefined) out.tool_call_id = m.tool_call_id;
  if (m.tool_calls !== undefined) {
    out.tool_calls = m.tool_calls.map((c, j) => {
      let args: unknown;
      try {
        args = JSON.parse(c.function.arguments);
      } catch {
        throw new ChatTemplateError(
          `messages[${i}].tool_calls[${j}].function.arguments is not valid JSON`,
          `messages[${i}].tool_calls[${j}].function.arguments`,
        );
      }
      return { id: c.id, type: c.type, function: { name: c.function.name, arguments: args } };
    });
  }
  return out;
}

/** Whether a pipeline step (or one in its Sequence, listed under `list`) has the given type. */
function hasStep(step: unknown, list: string, type: string, match: (s: Json) => boolean = () => true): boolean {
  if (!isObject(step)) return false;
  if (step.type === type && match(step)) return true;
  const inner = step[list];
  return Array.isArray(inner) && inner.some((s) => hasStep(s, list, type, match));
}

/** SentencePiece's leading "▁": a Prepend normalizer (Llama 2's legacy file) or a Metaspace pre-tokenizer. */
function prependsSpace(tokenizerJson: Json): boolean {
  return (
    hasStep(tokenizerJson.normalizer, "normalizers", "Prepend", (s) => s.prepend === "\u2581") ||
    hasStep(
      tokenizerJson.pre_tokenizer,
      "pretokenizers",
      "Metaspace",
      (s) => s.add_prefix_space === true || (typeof s.prepend_scheme === "string" && s.prepend_scheme !== "never"),
    )
  );
}

/**
 * GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the other 68 were moved to
 * U+0100 onwards in byte order.
 */
const BYTE_LEVEL_DECODE: ReadonlyMap<string, number> = (() => {
  const map = new Map<string, number>();
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    map.set(String.fromCharCode(printable ? b : 256 + shifted++), b);
  }
  return map;
})();
