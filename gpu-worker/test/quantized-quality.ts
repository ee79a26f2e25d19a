/**
 * Next-token agreement of a quantized model with its f32 original: logits at 1024 teacher-forced positions
 * (16 fixed token sequences × 64 positions), top-1 agreement and mean KL(f32 ‖ quantized). Shared by the
 * quality test and `npm run bench:engine`.
 */
import { ModelRunner } from "../src/engine/model-runner.ts";
import { compileModel } from "../src/model/compiled-model.ts";
import { loadLlamaConfig } from "../src/model/config.ts";
import type { Quantization } from "../src/model/quantize.ts";

const SEQS = 16;
const LEN = 64;
const BLOCK = 16;

/** Fixed pseudo-random token sequences (after bos). */
const sequences = Array.from({ length: SEQS }, (_, s) =>
  Array.from({ length: LEN }, (_, i) => (i === 0 ? 1 : 3 + ((s * 7919 + i * 104729) % 31990))),
);

/** Logits at every position of every sequence, [SEQS * LEN][vocab], decoding one token per step. */
export async function allLogits(dir: string, quantization: Quantization, numThreads = 2): Promise<Float32Array[]> {
  const cfg = loadLlamaConfig(dir);
  const blocksPerSeq = LEN / BLOCK;
  const runner = await ModelRunner.create(compileModel(dir, cfg, { quantization }), cfg, {
    numBlocks: SEQS * blocksPerSeq,
    blockSize: BLOCK,
    numThreads,
  });
  const tables = sequences.map((_, s) => Array.from({ length: blocksPerSeq }, (_, b) => s * blocksPerSeq + b));
  const out: Float32Array[] = Array.from({ length: SEQS * LEN });
  for (let pos = 0; pos < LEN; pos++) {
    const { logits } = await runner.execute(
      sequences.map((seq, s) => ({ tokenIds: [seq[pos]], startPos: pos, blockTable: tables[s], needLogits: true })),
    );
    for (let s = 0; s < SEQS; s++) out[s * LEN + pos] = logits.slice(s * cfg.vocabSize, (s + 1) * cfg.vocabSize);
  }
  return out;
}

function logSoftmax(x: Float32Array): Float64Array {
  let m = Number.NEGATIVE_INFINITY;
  for (const v of x) m = Math.max(m, v);
  let sum = 0;
  for (const v of x) sum += Math.exp(v - m);
  const lse = m + Math.log(sum);
  return Float64Array.from(x, (v) => v - lse);
}

function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** Top-1 agreement and mean KL(p ‖ q) in nats over all positions. */
export function compare(ref: Float32Array[], q: Float32Array[]): { top1: number; kl: number } {
  let agree = 0;
  let kl = 0;
  for (let i = 0; i < ref.length; i++) {
    if (argmax(ref[i]) === argmax(q[i])) agree++;
    const lp = logSoftmax(ref[i]);
    const lq = logSoftmax(q[i]);
    let k = 0;
    for (let j = 0; j < lp.length; j++) k += Math.exp(lp[j]) * (lp[j] - lq[j]);
    kl += k;
  }
  return { top1: agree / ref.length, kl: kl / ref.length };
}
