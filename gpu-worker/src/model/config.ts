import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ModelLoadError } from "./errors.ts";

/** Rope frequency scaling as Llama 3.1+ configs declare it (`rope_scaling.rope_type == "llama3"`). */
export interface Llama3RopeScaling {
  type: "llama3";
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

/** The subset of a Hugging Face `LlamaConfig` the engine needs, with defaults applied. */
export interface LlamaConfig {
  hiddenSize: number;
  intermediateSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  /** < numAttentionHeads for grouped-query attention, 1 for multi-query. */
  numKeyValueHeads: number;
  /** hidden_size / num_attention_heads unless the config says otherwise (Llama 3.2 3B does). */
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: Llama3RopeScaling | null;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  vocabSize: number;
  bosTokenId: number | null;
  /** eos may be a list in Llama 3 configs; any of them ends generation. */
  eosTokenIds: number[];
  /** The checkpoint's storage dtype as declared (`torch_dtype`), informational only. */
  torchDtype: string | null;
}

type Json = Record<string, unknown>;

function field<T>(file: string, cfg: Json, key: string, check: (v: unknown) => v is T, what: string): T {
  const v = cfg[key];
  if (!check(v)) throw new ModelLoadError(file, `field "${key}" must be ${what}, got ${JSON.stringify(v)}`);
  return v;
}
const isPosInt = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v) && v > 0;
const isPosNum = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v) && v > 0;

function idList(v: unknown): number[] {
  if (v === undefined || v === null) return [];
  const list = Array.isArray(v) ? v : [v];
  return list.filter((x): x is number => typeof x === "number" && Number.isInteger(x) && x >= 0);
}

/**
 * Validate a parsed `config.json` object. `generation` (the optional generation_config.json) overrides
 * bos/eos the way transformers does when generating.
 */
export function parseLlamaConfig(cfg: Json, file = "config.json", generation: Json = {}): LlamaConfig {
  const modelType = cfg.model_type;
  if (modelType !== "llama") {
    throw new ModelLoadError(file, `unsupported model_type ${JSON.stringify(modelType)}: only "llama" is supported`);
  }
  const archs = cfg.architectures;
  if (archs !== undefined && !(Array.isArray(archs) && archs.includes("LlamaForCausalLM"))) {
    throw new ModelLoadError(file, `unsupported architectures ${JSON.stringify(archs)}: expected LlamaForCausalLM`);
  }
  const qc = cfg.quantization_config as Json | null | undefined;
  if (qc !== undefined && qc !== null) {
    const method = typeof qc.quant_method === "string" ? qc.quant_method : "unknown";
    throw new ModelLoadError(
      file,
      `pre-quantized checkpoints are not supported (quantization_config.quant_method "${method}"): serve the ` +
        "F32/F16/BF16 checkpoint with --quantization int8 or int4 instead",
    );
  }
  const hiddenSize = field(file, cfg, "hidden_size", isPosInt, "a positive integer");
  const numAttentionHeads = field(file, cfg, "num_attention_heads", isPosInt, "a positive integer");
  const numKeyValueHeads =
    cfg.num_key_value_heads === undefined || cfg.num_key_value_heads === null
      ? numAttentionHeads
      : field(file, cfg, "num_key_value_heads", isPosInt, "a positive integer");
  if (numAttentionHeads % numKeyValueHeads !== 0) {
    throw new ModelLoadError(
      file,
      `num_attention_heads (${numAttentionHeads}) must be a multiple of num_key_value_heads (${numKeyValueHeads})`,
    );
  }
  let headDim: number;
  if (cfg.head_dim === undefined || cfg.head_dim === null) {
    if (hiddenSize % numAttentionHeads !== 0) {
      throw new ModelLoadError(
        file,
        `hidden_size (${hiddenSize}) is not divisible by num_attention_heads (${numAttentionHeads})`,
      );
    }
    headDim = hiddenSize / numAttentionHeads;
  } else {
    headDim = field(file, cfg, "head_dim", isPosInt, "a positive integer");
  }
  if (headDim % 2 !== 0) throw new ModelLoadError(file, `head_dim (${headDim}) must be even for rotary embeddings`);

  let ropeScaling: Llama3RopeScaling | null = null;
  const rs = cfg.rope_scaling as Json | null | undefined;
  if (rs !== undefined && rs !== null) {
    const kind = rs.rope_type ?? rs.type;
    if (kind === "default") {
      ropeScaling = null;
    } else if (kind === "llama3") {
      const f = `${file} rope_scaling`;
      ropeScaling = {
        type: "llama3",
        factor: field(f, rs, "factor", isPosNum, "a positive number"),
        lowFreqFactor: field(f, rs, "low_freq_factor", isPosNum, "a positive number"),
        highFreqFactor: field(f, rs, "high_freq_factor", isPosNum, "a positive number"),
        originalMaxPositionEmbeddings: field(f, rs, "original_max_position_embeddings", isPosInt, "a positive integer"),
      };
    } else {
      throw new ModelLoadError(
        file,
        `unsupported rope_scaling type ${JSON.stringify(kind)}: supported are "default" and "llama3"`,
      );
    }
  }
  for (const key of ["attention_bias", "mlp_bias"]) {
    if (cfg[key] === true) throw new ModelLoadError(file, `${key}=true is not supported`);
  }
  const genBos = generation.bos_token_id;
  const genEos = idList(generation.eos_token_id);
  const bos = typeof genBos === "number" ? genBos : typeof cfg.bos_token_id === "number" ? cfg.bos_token_id : null;
  return {
    hiddenSize,
    intermediateSize: field(file, cfg, "intermediate_size", isPosInt, "a positive integer"),
    numHiddenLayers: field(file, cfg, "num_hidden_layers", isPosInt, "a positive integer"),
    numAttentionHeads,
    numKeyValueHeads,
    headDim,
    rmsNormEps: cfg.rms_norm_eps === undefined ? 1e-6 : field(file, cfg, "rms_norm_eps", isPosNum, "a positive number"),
    ropeTheta: cfg.rope_theta === undefined ? 10000 : field(file, cfg, "rope_theta", isPosNum, "a positive number"),
    ropeScaling,
    maxPositionEmbeddings:
      cfg.max_position_embeddings === undefined
        ? 2048
        : field(file, cfg, "max_position_embeddings", isPosInt, "a positive integer"),
    tieWordEmbeddings: cfg.tie_word_embeddings === true,
    vocabSize: field(file, cfg, "vocab_size", isPosInt, "a positive integer"),
    bosTokenId: bos,
    eosTokenIds: genEos.length > 0 ? genEos : idList(cfg.eos_token_id),
    torchDtype: typeof cfg.torch_dtype === "string" ? cfg.torch_dtype : null,
  };
}

function readJson(dir: string, name: string, optional: boolean): Json | null {
  const path = join(dir, name);
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    if (optional && (e as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw new ModelLoadError(path, (e as NodeJS.ErrnoException).code === "ENOENT" ? "file not found" : String(e));
  }
  try {
    const v = JSON.parse(text);
    if (typeof v !== "object" || v === null || Array.isArray(v)) throw new Error("not a JSON object");
    return v as Json;
  } catch (e) {
    throw new ModelLoadError(path, `invalid JSON: ${(e as Error).message}`);
  }
}

/** Read `config.json` (and `generation_config.json` when present) from a checkpoint directory. */
export function loadLlamaConfig(dir: string): LlamaConfig {
  const cfg = readJson(dir, "config.json", false) as Json;
  const gen = readJson(dir, "generation_config.json", true) ?? {};
  return parseLlamaConfig(cfg, join(dir, "config.json"), gen);
}

export { readJson as readJsonFile };
