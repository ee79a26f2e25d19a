/**
 * `llama-worker random-model --shape <shape> [--dtype f32|f16|bf16] OUT`: a deterministic random checkpoint in
 * Hugging Face layout with a real model's shape, so big sizes can be tested and benchmarked offline.
 *
 * @module
 */
import { parseArgs } from "node:util";
import cliProgress from "cli-progress";
import { DEFAULT_MODEL_SHAPES } from "./model/default-model.ts";
import { PUBLISHED_SHAPES, writeRandomLlama } from "./model/random-model.ts";
import type { SafetensorsDtype } from "./model/safetensors.ts";

const SHAPES = { ...DEFAULT_MODEL_SHAPES, ...PUBLISHED_SHAPES };
type Shape = keyof typeof SHAPES;
const DTYPES: Record<string, SafetensorsDtype> = { f32: "F32", f16: "F16", bf16: "BF16" };
/** The published models' own tokenizers; the small shapes share Llama 2's 32000-token one. */
const TOKENIZER: Record<Shape, "llama2" | "llama3"> = {
  default: "llama2",
  bench: "llama2",
  "llama2-7b": "llama2",
  "llama3-8b": "llama3",
};

export const RANDOM_MODEL_USAGE = `Usage: llama-worker random-model --shape <shape> [--dtype <dtype>] [--seed <n>] OUT

Writes a random-weight LLaMA checkpoint (config.json, safetensors shards, tokenizer) into the empty or new
directory OUT. Same options, same bytes, on every machine. The text such a model generates is meaningless.

  --shape <shape>   ${Object.keys(SHAPES).join(" | ")} (default: default)
  --dtype <dtype>   f32 | f16 | bf16 (default: bf16, as the published checkpoints)
  --seed <n>        weights' seed (default 1)
`;

/** The error a bad flag value gets: one line, exit code 2. */
export class RandomModelUsageError extends Error {
  override name = "RandomModelUsageError";
}

export async function randomModelCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: {
      shape: { type: "string" },
      dtype: { type: "string" },
      seed: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
    allowPositionals: true,
    strict: true,
  });
  if (values.help) {
    process.stdout.write(RANDOM_MODEL_USAGE);
    return 0;
  }
  const shape = (values.shape ?? "default") as Shape;
  if (!(shape in SHAPES)) {
    throw new RandomModelUsageError(`--shape must be one of ${Object.keys(SHAPES).join(", ")}, got "${shape}"`);
  }
  const dtype = DTYPES[values.dtype ?? "bf16"];
  if (!dtype) throw new RandomModelUsageError(`--dtype must be f32, f16 or bf16, got "${values.dtype}"`);
  const seed = Number(values.seed ?? 1);
  if (!Number.isSafeInteger(seed)) throw new RandomModelUsageError(`--seed must be an integer, got "${values.seed}"`);
  if (positionals.length !== 1) throw new RandomModelUsageError("give exactly one output directory");
  const out = positionals[0];

  const progress = new ParamsProgress(`random-model ${shape} ${values.dtype ?? "bf16"}`);
  const shards = shape === "llama2-7b" || shape === "llama3-8b" ? 4 : 1;
  try {
    writeRandomLlama(out, { config: SHAPES[shape], seed, dtype, shards, tokenizer: TOKENIZER[shape] }, (d, t) =>
      progress.update(d, t),
    );
  } finally {
    progress.stop();
  }
  process.stderr.write(`wrote ${out}\n`);
  return 0;
}

/**
 * Parameters processed so far: a cli-progress bar on a TTY, otherwise a log line every 10 % (CI logs, pipes).
 */
export class ParamsProgress {
  private bar: cliProgress.SingleBar | null = null;
  private lastDecile = -1;

  constructor(private readonly label: string) {}

  update(done: number, total: number): void {
    if (process.stderr.isTTY) {
      if (!this.bar) {
        this.bar = new cliProgress.SingleBar(
          {
            stream: process.stderr,
            format: `${this.label} [{bar}] {percentage}% | {value}/{total} M params | ETA {eta}s`,
          },
          cliProgress.Presets.shades_classic,
        );
        this.bar.start(Math.round(total / 1e6), 0);
      }
      this.bar.update(Math.round(done / 1e6));
      return;
    }
    const decile = Math.floor((done / total) * 10);
    if (decile !== this.lastDecile) {
      this.lastDecile = decile;
      process.stderr.write(
        `${this.label}: ${decile * 10}% (${(done / 1e9).toFixed(2)} of ${(total / 1e9).toFixed(2)} B params)\n`,
      );
    }
  }

  stop(): void {
    this.bar?.stop();
    this.bar = null;
  }
}
