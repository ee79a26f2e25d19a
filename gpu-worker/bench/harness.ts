/**
 * What every benchmark section shares: the run's options, the results record (the `--json` line), and the
 * decode-throughput measurement.
 *
 * @module
 */
import { availableParallelism } from "node:os";
import { parseArgs } from "node:util";
import type { LLMEngine } from "../src/engine/llm-engine.ts";
import type { SamplingParams } from "../src/engine/types.ts";

const { values: args } = parseArgs({
  options: {
    quick: { type: "boolean" },
    json: { type: "boolean" },
    threads: { type: "string" },
    big: { type: "boolean" },
  },
  allowPositionals: true, // big-model-child.ts passes its own
});
export const quick = args.quick ?? false;
export const json = args.json ?? false;
/** `--big`: also the llama2-7b-shaped rows (generates a 13 GB random checkpoint on first use). */
export const big = args.big ?? false;
/** ONNX Runtime intra-op threads of every engine in the run: `--threads`, else LLAMA_THREADS, else every core. */
export const threads = Number(args.threads ?? process.env.LLAMA_THREADS ?? availableParallelism());
if (!Number.isInteger(threads) || threads < 1) throw new Error(`--threads must be an integer >= 1, got ${threads}`);

export const results: Record<string, number | string> = {};
export const log = (line: string) => process.stdout.write(`${line}\n`);

export function record(name: string, value: number, digits = 2): number {
  results[name] = Number(value.toFixed(digits));
  return value;
}

export const decode = (maxTokens: number): Partial<SamplingParams> => ({ temperature: 0, maxTokens, ignoreEos: true });

export function promptOf(len: number, salt: number): number[] {
  return [1, ...Array.from({ length: len - 1 }, (_, j) => 100 + ((salt * 7919 + j * 31) % 30000))];
}

/** Aggregate decode throughput of `n` concurrent streams, counted once every stream has its first token. */
export async function decodeThroughput(
  engine: LLMEngine,
  n: number,
  tokens: number,
  sampling: Partial<SamplingParams> = {},
): Promise<number> {
  let started = 0;
  let tStart = 0;
  let counted = 0;
  await Promise.all(
    Array.from({ length: n }, async (_, i) => {
      let first = true;
      for await (const e of engine.submit({
        requestId: `tp-${n}-${i}-${Math.random()}`,
        prompt: promptOf(8, i),
        sampling: { ...decode(tokens), ...sampling },
      })) {
        if (e.type !== "delta") continue;
        if (first) {
          first = false;
          if (++started === n) tStart = performance.now();
        } else if (started === n) counted += e.tokenIds.length;
      }
    }),
  );
  return (counted * 1000) / (performance.now() - tStart);
}

export function percentile(xs: number[], q: number): number {
  return [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))];
}
