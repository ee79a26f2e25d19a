/**
 * The tensors a LLaMA checkpoint must contain, by their Hugging Face names, and a validated view of a checkpoint
 * directory that has exactly those. Validation happens once at `open`, so graph building and weight upload never
 * meet a missing tensor or a wrong shape.
 *
 * @module
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { LlamaConfig } from "./config.ts";
import { ModelLoadError } from "./errors.ts";
import {
  openCheckpointTensors,
  PRE_QUANTIZED_MESSAGE,
  PRE_QUANTIZED_TENSOR,
  readTensorF32,
  type SafetensorsDtype,
  type TensorInfo,
} from "./safetensors.ts";

export interface WeightSpec {
  name: string;
  shape: number[];
  /** The config.json fields behind each dim, e.g. "num_key_value_heads*head_dim = 2*64", for error messages. */
  dims?: string[];
}

/**
 * Every tensor the model reads, in forward order: embeddings, per-layer attention and MLP, final norm, lm_head
 * (omitted when `tie_word_embeddings`, where the embedding table doubles as the classifier).
 */
export function llamaWeightSpecs(config: LlamaConfig): WeightSpec[] {
  const { hiddenSize: hidden, intermediateSize: inter, vocabSize: vocab, headDim } = config;
  const qDim = config.numAttentionHeads * headDim;
  const kvDim = config.numKeyValueHeads * headDim;
  const H = `hidden_size = ${hidden}`;
  const I = `intermediate_size = ${inter}`;
  const Q = `num_attention_heads*head_dim = ${config.numAttentionHeads}*${headDim}`;
  const KV = `num_key_value_heads*head_dim = ${config.numKeyValueHeads}*${headDim}`;
  const V = `vocab_size = ${vocab}`;
  const spec = (name: string, shape: number[], dims: string[]): WeightSpec => ({ name, shape, dims });

  const specs = [spec("model.embed_tokens.weight", [vocab, hidden], [V, H])];
  for (let l = 0; l < config.numHiddenLayers; l++) {
    const p = `model.layers.${l}`;
    specs.push(
      spec(`${p}.input_layernorm.weight`, [hidden], [H]),
      spec(`${p}.self_attn.q_proj.weight`, [qDim, hidden], [Q, H]),
      spec(`${p}.self_attn.k_proj.weight`, [kvDim, hidden], [KV, H]),
      spec(`${p}.self_attn.v_proj.weight`, [kvDim, hidden], [KV, H]),
      spec(`${p}.self_attn.o_proj.weight`, [hidden, qDim], [H, Q]),
      spec(`${p}.post_attention_layernorm.weight`, [hidden], [H]),
      spec(`${p}.mlp.gate_proj.weight`, [inter, hidden], [I, H]),
      spec(`${p}.mlp.up_proj.weight`, [inter, hidden], [I, H]),
      spec(`${p}.mlp.down_proj.weight`, [hidden, inter], [H, I]),
    );
  }
  specs.push(spec("model.norm.weight", [hidden], [H]));
  if (!config.tieWordEmbeddings) specs.push(spec("lm_head.weight", [vocab, hidden], [V, H]));
  return specs;
}

/** The file a whole-checkpoint complaint (a missing tensor) should point at. */
function checkpointFile(dir: string): string {
  const single = join(dir, "model.safetensors");
  return existsSync(single) ? single : join(dir, "model.safetensors.index.json");
}

function shapeMismatch(spec: WeightSpec, info: TensorInfo): ModelLoadError {
  const fmt = (s: number[]) => `[${s.join(", ")}]`;
  const from = spec.dims ? ` from [${spec.dims.join(", ")}]` : "";
  return new ModelLoadError(
    info.file,
    `shape ${fmt(info.shape)} does not match config.json: expected ${fmt(spec.shape)}${from}`,
    spec.name,
  );
}

/**
 * A checkpoint whose tensors have been checked against the config. `tensors` holds exactly the spec'd tensors
 * (extras such as `rotary_emb.inv_freq`, or `lm_head.weight` in a tied checkpoint, are ignored).
 *
 * @example
 * const config = loadLlamaConfig(dir);
 * const weights = LlamaWeights.open(dir, config);
 * const wq = weights.readF32("model.layers.0.self_attn.q_proj.weight"); // (heads*headDim, hidden)
 */
export class LlamaWeights {
  private constructor(
    readonly dir: string,
    readonly tensors: Map<string, TensorInfo>,
    /** The dtype holding the most parameters: what the checkpoint is "stored in". */
    readonly dtype: SafetensorsDtype,
  ) {}

  static open(dir: string, config: LlamaConfig): LlamaWeights {
    const all = openCheckpointTensors(dir);
    const tensors = new Map<string, TensorInfo>();
    const paramsByDtype = new Map<SafetensorsDtype, number>();
    // GPTQ/AWQ/bitsandbytes tensors without a quantization_config to say so: name what is unsupported.
    for (const [name, info] of all) {
      if (PRE_QUANTIZED_TENSOR.test(name)) throw new ModelLoadError(info.file, PRE_QUANTIZED_MESSAGE, name);
    }
    for (const spec of llamaWeightSpecs(config)) {
      const info = all.get(spec.name);
      if (!info) {
        throw new ModelLoadError(
          checkpointFile(dir),
          `missing tensor (expected shape [${spec.shape.join(", ")}]); the checkpoint does not match config.json`,
          spec.name,
        );
      }
      if (info.shape.length !== spec.shape.length || info.shape.some((d, i) => d !== spec.shape[i])) {
        throw shapeMismatch(spec, info);
      }
      tensors.set(spec.name, info);
      const n = info.shape.reduce((a, b) => a * b, 1);
      paramsByDtype.set(info.dtype, (paramsByDtype.get(info.dtype) ?? 0) + n);
    }
    let dtype: SafetensorsDtype = "F32";
    let most = -1;
    for (const [dt, n] of paramsByDtype) {
      if (n > most) [dtype, most] = [dt, n];
    }
    return new LlamaWeights(dir, tensors, dtype);
  }

  info(name: string): TensorInfo {
    const info = this.tensors.get(name);
    if (!info) throw new ModelLoadError(this.dir, "not a tensor of this model (see llamaWeightSpecs)", name);
    return info;
  }

  /** The tensor as float32 (widened from F16/BF16), row-major in its Hugging Face shape. */
  readF32(name: string): Float32Array {
    return readTensorF32(this.info(name));
  }
}
