import * as ort from "onnxruntime-node";
import { beforeAll, describe, expect, it } from "vitest";
import { DType, GraphBuilder } from "../model/onnx-builder.ts";
import { buildSamplingHead, NO_MIN_P } from "../model/sampling-head.ts";
import { deviceOutputs, sampleFromDevice } from "./device-sampler.ts";
import { type SampledToken, type SamplingFailure, sampleBatch } from "./sampler.ts";
import { validateSamplingParams } from "./sampling-params.ts";
import { SeededRng } from "./seeded-rng.ts";
import type { SamplingParams } from "./types.ts";

const V = 1000;

/** The sampling head (run here on the CPU provider), and the softmax the CPU backend hands sampler.ts. */
let head: ort.InferenceSession;
let softmax: ort.InferenceSession;
beforeAll(async () => {
  head = await ort.InferenceSession.create(buildSamplingHead(V));
  const g = new GraphBuilder();
  const logits = g.input("logits", DType.float, ["S", V]);
  const invT = g.input("inv_temperature", DType.float, ["S"]);
  g.op("Softmax", [g.op("Mul", [logits, g.op("Unsqueeze", [invT, g.ints([1])])])], { axis: -1 }, "probs");
  g.output("probs", DType.float, ["S", V]);
  g.op("ArgMax", [logits], { axis: 1, keepdims: 0 }, "argmax");
  g.output("argmax", DType.int64, ["S"]);
  softmax = await ort.InferenceSession.create(g.build("probs"));
});

/** Random logits: peaked rows (a few tokens hold most mass) and flat ones, with exact ties sprinkled in. */
function randomLogits(rows: number, rng: SeededRng): Float32Array {
  const x = new Float32Array(rows * V);
  for (let r = 0; r < rows; r++) {
    const scale = r % 2 === 0 ? 6 : 0.7;
    for (let j = 0; j < V; j++) x[r * V + j] = scale * (rng.next() + rng.next() + rng.next() - 1.5);
    x[r * V + 17] = x[r * V + 400]; // a tie
  }
  return x;
}

/** Tokens from the device path (falling back to sampleBatch on the row's logits, as the runner does). */
async function viaDevice(logits: Float32Array, params: SamplingParams[], draws: number[]) {
  const S = params.length;
  const inv = Float32Array.from(params, (p) => (p.temperature > 0 ? 1 / p.temperature : 1));
  const minP = Float32Array.from(params, (p) =>
    p.minP > 0 && p.temperature > 0 ? p.temperature * Math.log(p.minP) : NO_MIN_P,
  );
  const logitsT = new ort.Tensor("float32", logits, [S, V]);
  const invT = new ort.Tensor("float32", inv, [S]);
  const out = await head.run({
    logits: logitsT,
    inv_temperature: invT,
    uniform: new ort.Tensor("float32", Float32Array.from(draws), [S]),
    min_p_offset: new ort.Tensor("float32", minP, [S]),
  });
  const host = await softmax.run({ logits: logitsT, inv_temperature: invT });
  const device = deviceOutputs(out, host.argmax.data as BigInt64Array, V);
  let onHost = 0;
  const tokens = params.map((p, i) => {
    const t = sampleFromDevice({ params: p, rng: null, promptTokenIds: [], outputTokenIds: [7] }, draws[i], device, i);
    if (t !== null) return t;
    onHost++;
    const row = logits.slice(i * V, (i + 1) * V);
    return sampleBatch(row, V, [{ params: p, rng: null, u: draws[i], promptTokenIds: [], outputTokenIds: [7] }])[0];
  });
  return { tokens, onHost, probs: host.probs.data as Float32Array, argmax: device.argmax };
}

function expectSame(got: (SampledToken | SamplingFailure)[], want: (SampledToken | SamplingFailure)[]) {
  expect(got.map((t) => t.tokenId)).toEqual(want.map((t) => t.tokenId));
  got.forEach((t, i) => {
    const w = want[i];
    if (w.error !== undefined || t.error !== undefined) return;
    expect(t.logprob === undefined).toBe(w.logprob === undefined);
    if (w.logprob !== undefined) expect(Math.abs((t.logprob ?? 0) - w.logprob)).toBeLessThan(1e-4);
    expect(t.topLogprobs?.map((x) => x.tokenId)).toEqual(w.topLogprobs?.map((x) => x.tokenId));
  });
}

describe("sampling from the device's candidates", () => {
  const cases: [string, Partial<SamplingParams>][] = [
    ["greedy", { temperature: 0 }],
    ["greedy with top_logprobs", { temperature: 0, logprobs: true, topLogprobs: 5 }],
    ["temperature (the device's draw)", { temperature: 0.8 }],
    ["temperature with logprobs", { temperature: 1.3, logprobs: true, topLogprobs: 3 }],
    ["min_p", { temperature: 1, minP: 0.05 }],
    ["top_k", { temperature: 0.9, topK: 20 }],
    ["top_k + top_p", { temperature: 1, topK: 50, topP: 0.8 }],
    ["top_p", { temperature: 0.7, topP: 0.9 }],
    ["top_p + min_p", { temperature: 1.1, topP: 0.95, minP: 0.01 }],
    ["top_k beyond the candidates (host)", { temperature: 1, topK: 200 }],
    ["logit_bias (host)", { temperature: 0.9, logitBias: { 3: 5 } }],
    ["repetition penalty (host)", { temperature: 0.9, repetitionPenalty: 1.3 }],
  ];

  it("gives the tokens and logprobs sampler.ts gives for the same logits and draws", async () => {
    const rng = new SeededRng(11);
    for (const [name, raw] of cases) {
      const params = validateSamplingParams(raw, { vocabSize: V });
      const rows = 16;
      const logits = randomLogits(rows, rng);
      const draws = Array.from({ length: rows }, () => rng.next());
      const ps = Array.from({ length: rows }, () => params);
      const dev = await viaDevice(logits, ps, draws);
      const want = sampleBatch(
        logits,
        V,
        ps.map((p, i) => ({ params: p, rng: null, u: draws[i], promptTokenIds: [], outputTokenIds: [7] })),
        { probs: dev.probs, argmax: dev.argmax },
      );
      expectSame(dev.tokens, want);
      // the device settles every row it can; bias, penalties and a large top_k always go to the host
      if (name.endsWith("(host)")) expect(dev.onHost, name).toBe(rows);
      else if (!name.startsWith("top_p")) expect(dev.onHost, name).toBe(0);
    }
  });

  it("settles a peaked row's nucleus on the device and sends a flat one's to the host", async () => {
    const rng = new SeededRng(5);
    const logits = randomLogits(2, rng); // row 1 is flat
    for (const j of [3, 99, 512]) logits[j] += 12; // row 0: three tokens hold nearly all the mass
    const params = validateSamplingParams({ temperature: 1, topP: 0.9 }, { vocabSize: V });
    const draws = [rng.next(), rng.next()];
    const dev = await viaDevice(logits, [params, params], draws);
    expect(dev.onHost).toBe(1);
    const want = sampleBatch(
      logits,
      V,
      draws.map((u) => ({ params, rng: null, u, promptTokenIds: [], outputTokenIds: [] })),
      { probs: dev.probs },
    );
    expectSame(dev.tokens, want);
  });
});
