/**
 * A plain TypeScript LLaMA forward pass, written for clarity rather than speed, in the shape of llama2.c's
 * forward(): the tests compare the ONNX Runtime engine against it. It shares nothing with the engine except
 * the config parser and the safetensors reader.
 */
import type { LlamaConfig } from "../src/model/config.ts";
import type { LlamaWeights } from "../src/model/weights.ts";

interface LayerWeights {
  attnNorm: Float32Array; // (dim)
  wq: Float32Array; // (heads*headDim, dim)
  wk: Float32Array; // (kvHeads*headDim, dim)
  wv: Float32Array; // (kvHeads*headDim, dim)
  wo: Float32Array; // (dim, heads*headDim)
  ffnNorm: Float32Array; // (dim)
  w1: Float32Array; // gate (hidden, dim)
  w2: Float32Array; // down (dim, hidden)
  w3: Float32Array; // up (hidden, dim)
}

export class ReferenceLlama {
  private readonly embed: Float32Array; // (vocab, dim)
  private readonly layers: LayerWeights[] = [];
  private readonly finalNorm: Float32Array; // (dim)
  private readonly lmHead: Float32Array; // (vocab, dim)
  private readonly invFreq: Float64Array; // (headDim/2)
  // KV cache per layer: (pos, kvHeads*headDim)
  private keyCache: number[][][] = [];
  private valueCache: number[][][] = [];

  constructor(
    readonly cfg: LlamaConfig,
    weights: LlamaWeights,
  ) {
    const w = (name: string) => weights.readF32(name);
    this.embed = w("model.embed_tokens.weight");
    for (let l = 0; l < cfg.numHiddenLayers; l++) {
      const p = `model.layers.${l}`;
      this.layers.push({
        attnNorm: w(`${p}.input_layernorm.weight`),
        wq: w(`${p}.self_attn.q_proj.weight`),
        wk: w(`${p}.self_attn.k_proj.weight`),
        wv: w(`${p}.self_attn.v_proj.weight`),
        wo: w(`${p}.self_attn.o_proj.weight`),
        ffnNorm: w(`${p}.post_attention_layernorm.weight`),
        w1: w(`${p}.mlp.gate_proj.weight`),
        w2: w(`${p}.mlp.down_proj.weight`),
        w3: w(`${p}.mlp.up_proj.weight`),
      });
    }
    this.finalNorm = w("model.norm.weight");
    this.lmHead = cfg.tieWordEmbeddings ? this.embed : w("lm_head.weight");
    this.invFreq = referenceInvFreq(cfg);
    this.reset();
  }

  reset(): void {
    this.keyCache = this.layers.map(() => []);
    this.valueCache = this.layers.map(() => []);
  }

  /** Feed one token at position `pos` (= tokens fed so far); returns the next-token logits (vocab). */
  forward(token: number, pos: number): Float64Array<ArrayBuffer> {
    const c = this.cfg;
    const dim = c.hiddenSize;
    const hd = c.headDim;
    const kvMul = c.numAttentionHeads / c.numKeyValueHeads; // query heads sharing one kv head
    // embed the token
    let x = Array.from(this.embed.subarray(token * dim, (token + 1) * dim));
    for (let l = 0; l < c.numHiddenLayers; l++) {
      const lw = this.layers[l];
      // attention rmsnorm, then q/k/v projections
      const xb = rmsnorm(x, lw.attnNorm, c.rmsNormEps);
      const q = matvec(lw.wq, xb, c.numAttentionHeads * hd);
      const k = matvec(lw.wk, xb, c.numKeyValueHeads * hd);
      const v = matvec(lw.wv, xb, c.numKeyValueHeads * hd);
      // RoPE, rotate-half layout: pairs (i, i + hd/2) within each head
      this.rope(q, c.numAttentionHeads, pos);
      this.rope(k, c.numKeyValueHeads, pos);
      this.keyCache[l][pos] = k;
      this.valueCache[l][pos] = v;
      // attention for each head over positions 0..pos
      const att = new Array<number>(c.numAttentionHeads * hd).fill(0);
      for (let h = 0; h < c.numAttentionHeads; h++) {
        const kvh = Math.floor(h / kvMul);
        const scores: number[] = [];
        for (let t = 0; t <= pos; t++) {
          let s = 0;
          for (let i = 0; i < hd; i++) s += q[h * hd + i] * this.keyCache[l][t][kvh * hd + i];
          scores.push(s / Math.sqrt(hd));
        }
        const p = softmax(scores);
        for (let t = 0; t <= pos; t++) {
          for (let i = 0; i < hd; i++) att[h * hd + i] += p[t] * this.valueCache[l][t][kvh * hd + i];
        }
      }
      // output projection and residual
      const o = matvec(lw.wo, att, dim);
      x = x.map((xi, i) => xi + o[i]);
      // feed-forward: w2(silu(w1(x)) * w3(x)) and residual
      const xf = rmsnorm(x, lw.ffnNorm, c.rmsNormEps);
      const gate = matvec(lw.w1, xf, c.intermediateSize);
      const up = matvec(lw.w3, xf, c.intermediateSize);
      const hb = gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]);
      const down = matvec(lw.w2, hb, dim);
      x = x.map((xi, i) => xi + down[i]);
    }
    // final rmsnorm and classifier
    const xn = rmsnorm(x, this.finalNorm, c.rmsNormEps);
    return Float64Array.from(matvec(this.lmHead, xn, c.vocabSize));
  }

  /** Greedy generation: feed the prompt, then the argmax token, `maxTokens` times. */
  generateGreedy(prompt: number[], maxTokens: number): number[] {
    this.reset();
    let logits: Float64Array<ArrayBuffer> = new Float64Array(0);
    prompt.forEach((t, pos) => {
      logits = this.forward(t, pos);
    });
    const out: number[] = [];
    for (let i = 0; i < maxTokens; i++) {
      const next = argmax(logits);
      out.push(next);
      logits = this.forward(next, prompt.length + i);
    }
    return out;
  }

  private rope(vec: number[], heads: number, pos: number): void {
    const hd = this.cfg.headDim;
    const half = hd / 2;
    for (let h = 0; h < heads; h++) {
      for (let i = 0; i < half; i++) {
        // the engine (like transformers) computes the angle in float32
        const angle = Math.fround(pos * Math.fround(this.invFreq[i]));
        const cos = Math.cos(angle);
        const sin = Math.sin(angle);
        const a = vec[h * hd + i];
        const b = vec[h * hd + half + i];
        vec[h * hd + i] = a * cos - b * sin;
        vec[h * hd + half + i] = b * cos + a * sin;
      }
    }
  }
}

/** inv_freq as transformers computes it, with llama3 scaling. */
function referenceInvFreq(c: LlamaConfig): Float64Array {
  const hd = c.headDim;
  const inv = new Float64Array(hd / 2).map((_, i) => 1 / c.ropeTheta ** ((2 * i) / hd));
  const rs = c.ropeScaling;
  if (!rs) return inv;
  const lowWavelen = rs.originalMaxPositionEmbeddings / rs.lowFreqFactor;
  const highWavelen = rs.originalMaxPositionEmbeddings / rs.highFreqFactor;
  return inv.map((f) => {
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < highWavelen) return f;
    if (wavelen > lowWavelen) return f / rs.factor;
    const smooth =
      (rs.originalMaxPositionEmbeddings / wavelen - rs.lowFreqFactor) / (rs.highFreqFactor - rs.lowFreqFactor);
    return (1 - smooth) * (f / rs.factor) + smooth * f;
  });
}

function rmsnorm(x: number[], weight: Float32Array, eps: number): number[] {
  let ss = 0;
  for (const v of x) ss += v * v;
  const scale = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => v * scale * weight[i]);
}

/** W (rows, cols) row-major times x (cols): Hugging Face's nn.Linear weight layout. */
function matvec(w: Float32Array, x: number[], rows: number): number[] {
  const cols = x.length;
  const out = new Array<number>(rows);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    const base = r * cols;
    for (let j = 0; j < cols; j++) s += w[base + j] * x[j];
    out[r] = s;
  }
  return out;
}

function softmax(x: number[]): number[] {
  const max = Math.max(...x);
  const e = x.map((v) => Math.exp(v - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

export function argmax(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}
