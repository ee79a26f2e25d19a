/**
 * The Llama-2 tokenizer files (`tokenizer.json` + `tokenizer_config.json`), rebuilt from the vocabulary and merges
 * that `llama-tokenizer-js` ships, so a generated model directory gets a genuine Llama-2 tokenizer without a network
 * download. The `tokenizer.json` layout is that of meta-llama/Llama-2-7b-hf: SentencePiece BPE expressed in Hugging
 * Face terms (metaspace normalizer, byte fallback, a decoder that undoes both).
 *
 * @module
 */
import llamaTokenizerJs from "llama-tokenizer-js";

/** SentencePiece's stand-in for a space ("▁", U+2581). */
const METASPACE = "\u2581";

const SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"] as const;

/**
 * The standard Llama-2-chat prompt format: `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>`
 * per turn. The generation prompt is implicit (the text already ends in `[/INST]`), so `add_generation_prompt`
 * changes nothing. Written as one line like the template in Meta's tokenizer_config.json; `\n` escapes are
 * resolved by the Jinja string literals.
 */
const LLAMA2_CHAT_TEMPLATE =
  "{% if messages[0]['role'] == 'system' %}" +
  "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}" +
  "{% else %}{% set system_message = none %}{% set loop_messages = messages %}{% endif %}" +
  "{% for message in loop_messages %}" +
  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}" +
  "{% endif %}" +
  "{% if loop.index0 == 0 and system_message is not none %}" +
  "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}" +
  "{% else %}{% set content = message['content'] %}{% endif %}" +
  "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}" +
  "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}" +
  "{% endfor %}";

/**
 * The merges in priority order. `llama-tokenizer-js` stores them as a Map from "left right" to a priority value
 * (2 * index + 1 of the pair in its packed data, which was written straight from tokenizer.json's merges list),
 * so sorting by that value recovers the original list. No Llama-2 token contains a plain space, so the key
 * splits back into its two halves unambiguously.
 */
function mergesInPriorityOrder(): string[] {
  return [...llamaTokenizerJs.merges.entries()].sort((a, b) => a[1] - b[1]).map(([pair]) => pair);
}

function buildVocab(): Record<string, number> {
  // fromEntries, not assignment: a token spelled "__proto__" must become a key, not a prototype.
  return Object.fromEntries(llamaTokenizerJs.vocabById.map((token, id) => [token, id]));
}

function buildTokenizerJson(): object {
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: SPECIAL_TOKENS.map((content, id) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    // Every text section gets a leading "▁" and spaces become "▁", exactly what SentencePiece does.
    normalizer: {
      type: "Sequence",
      normalizers: [
        { type: "Prepend", prepend: METASPACE },
        { type: "Replace", pattern: { String: " " }, content: METASPACE },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [
        { SpecialToken: { id: "<s>", type_id: 0 } },
        { Sequence: { id: "A", type_id: 0 } },
        { SpecialToken: { id: "<s>", type_id: 1 } },
        { Sequence: { id: "B", type_id: 1 } },
      ],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    // The inverse of the normalizer: "▁" back to " ", <0xNN> tokens back to bytes, and the one space the
    // normalizer prepended stripped off the front.
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: METASPACE }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab: buildVocab(),
      merges: mergesInPriorityOrder(),
    },
  };
}

function buildTokenizerConfig(): object {
  return {
    tokenizer_class: "LlamaTokenizer",
    add_bos_token: true,
    add_eos_token: false,
    bos_token: "<s>",
    eos_token: "</s>",
    unk_token: "<unk>",
    pad_token: null,
    // tokenizer.json above is the "legacy" SentencePiece behaviour (a "▁" after every special token).
    legacy: true,
    // Llama-2's context length.
    model_max_length: 4096,
    clean_up_tokenization_spaces: false,
    padding_side: "right",
    chat_template: LLAMA2_CHAT_TEMPLATE,
  };
}

/**
 * Build the Llama-2 `tokenizer.json` and `tokenizer_config.json` contents. Nothing is written to disk; callers
 * `JSON.stringify` the objects into a model directory.
 *
 * @example
 * const { tokenizerJson, tokenizerConfig } = llama2TokenizerFiles();
 * writeFileSync(join(dir, "tokenizer.json"), JSON.stringify(tokenizerJson));
 * writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(tokenizerConfig, null, 2));
 */
export function llama2TokenizerFiles(): { tokenizerJson: object; tokenizerConfig: object } {
  return { tokenizerJson: buildTokenizerJson(), tokenizerConfig: buildTokenizerConfig() };
}
