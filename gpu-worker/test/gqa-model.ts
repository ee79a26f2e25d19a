import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { writeRandomLlama } from "../src/model/random-model.ts";

/**
 * A small random GQA checkpoint (8 heads sharing 2 KV heads, 2 layers, Llama 2 vocabulary) in a fresh temporary
 * directory: cheap enough for the WebGPU tests on lavapipe. Returns the directory and a function that removes it.
 */
export function writeGqaModel(): { dir: string; remove: () => void } {
  const dir = mkdtempSync(join(tmpdir(), "llama-gqa-"));
  writeRandomLlama(dir, {
    seed: 7,
    tokenizer: "llama2",
    config: {
      hidden_size: 64,
      intermediate_size: 160,
      num_hidden_layers: 2,
      num_attention_heads: 8,
      num_key_value_heads: 2,
      max_position_embeddings: 256,
      vocab_size: 32000,
    },
  });
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}
