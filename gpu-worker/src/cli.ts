import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import cliProgress from "cli-progress";
import { type EngineOptions, EngineRequestError, LLMEngine } from "./engine/llm-engine.ts";
import { ExecutionProviderError } from "./engine/model-runner.ts";
import { SamplingParamError } from "./engine/sampling-params.ts";
import type { FinishReason, SamplingParams } from "./engine/types.ts";
import { ModelLoadError } from "./model/errors.ts";
import { resolveModel } from "./model/model-source.ts";
import { parseQuantization } from "./model/quantize.ts";

const USAGE = `Usage: llama-worker <command> [options]

Commands:
  generate   Generate completions for one or more prompts (all run at once through the scheduler)
  serve      Serve a worker pool over NATS (see --help of serve)
  compile    Compile a checkpoint once into a directory workers serve without compiling (see --help of compile)
  random-model  Write a random-weight checkpoint with a real model's shape (see --help of random-model)

--model, in every command: a checkpoint directory, a compiled directory, or a Hugging Face repo id
org/name[@revision], downloaded into the Hub cache (HF_ENDPOINT, HF_TOKEN, HF_HOME are honoured).

generate options:
  --model <m>                The model (default: the generated default model, random weights: its output is
                             meaningless)
  --prompt <text>            Prompt text; repeat for several prompts ("" = generate from BOS alone)
  --prompts-file <file>      One JSON string per line, each a prompt
  --chat                     Render each prompt as a user message through the model's chat template
  --max-tokens <n>           Tokens to generate per prompt (default 64)
  --temperature <t>          0 = greedy (default 0)
  --top-p <p>  --top-k <k>  --min-p <p>  --seed <n>  --repetition-penalty <r>
  --stop <text>              Stop string; repeat for several
  --ignore-eos               Keep generating past the end-of-sequence token
  --json                     One JSON object per prompt, in input order:
                             {"prompt_token_ids","token_ids","text","finish_reason","cached_tokens"}
  --max-num-seqs <n>  --max-num-batched-tokens <n>  --block-size <n>  --kv-cache-bytes <n>
  --no-prefix-caching        Disable automatic prefix caching
  --device <cpu|cuda>        ONNX Runtime execution provider (default cpu)
  --quantization <q>         Weight format: none (f32), int8 or int4 (default none; env LLAMA_QUANTIZATION)
  --threads <n>              ONNX Runtime intra-op threads (default: every core; env LLAMA_THREADS)
`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    if (command === "generate") return await generate(rest);
    if (command === "compile") {
      const { compileCommand } = await import("./compile/compile-command.ts");
      return await compileCommand(rest);
    }
    if (command === "serve") {
      const { serveCommand } = await import("./service/serve-command.ts");
      return await serveCommand(rest);
    }
    if (command === "random-model") {
      const { randomModelCommand, RandomModelUsageError } = await import("./random-model-command.ts");
      try {
        return await randomModelCommand(rest);
      } catch (e) {
        if (!(e instanceof RandomModelUsageError)) throw e;
        process.stderr.write(`llama-worker random-model: ${e.message}\n`);
        return 2;
      }
    }
    process.stdout.write(USAGE);
    return command === undefined || command === "--help" || command === "-h" ? 0 : 2;
  } catch (e) {
    if (
      e instanceof ModelLoadError ||
      e instanceof SamplingParamError ||
      e instanceof EngineRequestError ||
      e instanceof ExecutionProviderError
    ) {
      process.stderr.write(`llama-worker: ${e.message}\n`);
      return 1;
    }
    if (e instanceof TypeError && (e as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`llama-worker: ${(e as Error).message}\n\n${USAGE}`);
      return 2;
    }
    throw e;
  }
}

function flagOrEnv<T>(parse: () => T, name: string): T {
  try {
    return parse();
  } catch (e) {
    throw new SamplingParamError(name, (e as Error).message);
  }
}

function threadsOption(v: string | undefined): number | undefined {
  if (v === undefined || v === "") return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1)
    throw new SamplingParamError("threads", `--threads must be an integer >= 1, got "${v}"`);
  return n;
}

function num(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === "" || !Number.isFinite(n))
    throw new SamplingParamError(name, `--${name} must be a number, got "${v}"`);
  return n;
}

async function generate(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: "string" },
      prompt: { type: "string", multiple: true },
      "prompts-file": { type: "string" },
      chat: { type: "boolean" },
      "max-tokens": { type: "string" },
      temperature: { type: "string" },
      "top-p": { type: "string" },
      "top-k": { type: "string" },
      "min-p": { type: "string" },
      "repetition-penalty": { type: "string" },
      seed: { type: "string" },
      stop: { type: "string", multiple: true },
      "ignore-eos": { type: "boolean" },
      json: { type: "boolean" },
      "max-num-seqs": { type: "string" },
      "max-num-batched-tokens": { type: "string" },
      "block-size": { type: "string" },
      "kv-cache-bytes": { type: "string" },
      "no-prefix-caching": { type: "boolean" },
      device: { type: "string" },
      quantization: { type: "string" },
      threads: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const prompts: string[] = [...(values.prompt ?? [])];
  if (values["prompts-file"]) {
    const file = values["prompts-file"];
    readFileSync(file, "utf8")
      .split("\n")
      .forEach((line, i) => {
        if (line.trim() === "") return;
        const v: unknown = JSON.parse(line);
        if (typeof v !== "string")
          throw new SamplingParamError("prompts-file", `${file}:${i + 1}: each line must be a JSON string`);
        prompts.push(v);
      });
  }
  if (prompts.length === 0) prompts.push("Once upon a time");

  const progress = new Progress(!values.json || process.stderr.isTTY);
  const source = await resolveModel(values.model, {
    tty: process.stderr.isTTY === true,
    log: (line) => process.stderr.write(`llama-worker: ${line}\n`),
  });
  const modelDir = source.dir;
  if (source.kind === "default" && !values.json)
    process.stderr.write("Using the generated default model: random weights, the output is meaningless.\n");
  const device = values.device ?? "cpu";
  if (device !== "cpu" && device !== "cuda")
    throw new SamplingParamError("device", `--device must be cpu or cuda, got "${device}"`);
  const engineOpts: EngineOptions = {
    modelDir,
    maxNumSeqs: num("max-num-seqs", values["max-num-seqs"]),
    maxNumBatchedTokens: num("max-num-batched-tokens", values["max-num-batched-tokens"]),
    blockSize: num("block-size", values["block-size"]),
    kvCacheBytes: num("kv-cache-bytes", values["kv-cache-bytes"]),
    enablePrefixCaching: !values["no-prefix-caching"],
    executionProvider: device,
    quantization: flagOrEnv(
      () => parseQuantization(values.quantization ?? process.env.LLAMA_QUANTIZATION),
      "quantization",
    ),
    numThreads: threadsOption(values.threads ?? process.env.LLAMA_THREADS),
    onProgress: (stage, done, total) => progress.update(stage, done, total),
  };
  const engine = await LLMEngine.create(engineOpts);
  progress.stop();

  const sampling: Partial<SamplingParams> = {
    maxTokens: num("max-tokens", values["max-tokens"]) ?? 64,
    temperature: num("temperature", values.temperature) ?? 0,
    ignoreEos: values["ignore-eos"] ?? false,
    stop: values.stop ?? [],
  };
  const opt = (key: keyof SamplingParams, flag: string) => {
    const v = num(flag, values[flag as keyof typeof values] as string | undefined);
    if (v !== undefined) (sampling as Record<string, unknown>)[key] = v;
  };
  opt("topP", "top-p");
  opt("topK", "top-k");
  opt("minP", "min-p");
  opt("repetitionPenalty", "repetition-penalty");
  opt("seed", "seed");

  // Submit everything first so the scheduler batches the prompts together.
  const streams = prompts.map((text, i) => {
    const prompt = values.chat
      ? engine.tokenizer.encodeChat([{ role: "user", content: text }], { addGenerationPrompt: true })
      : text;
    return engine.submit({ requestId: `cli-${i}`, prompt, sampling });
  });
  const results = await Promise.all(streams.map(collect));
  for (const r of results) {
    if (values.json) {
      process.stdout.write(
        `${JSON.stringify({
          prompt_token_ids: r.promptTokenIds,
          token_ids: r.tokenIds,
          text: r.text,
          finish_reason: r.finishReason,
          cached_tokens: r.cachedTokens,
        })}\n`,
      );
    } else {
      process.stdout.write(`${r.text}\n`);
      if (prompts.length > 1) process.stdout.write("---\n");
    }
  }
  return 0;
}

interface Collected {
  promptTokenIds: number[];
  tokenIds: number[];
  text: string;
  finishReason: FinishReason;
  cachedTokens: number;
}

async function collect(stream: AsyncIterable<import("./engine/types.ts").EngineEvent>): Promise<Collected> {
  const r: Collected = { promptTokenIds: [], tokenIds: [], text: "", finishReason: "abort", cachedTokens: 0 };
  for await (const e of stream) {
    if (e.type === "delta") {
      r.text += e.text;
      r.tokenIds.push(...e.tokenIds);
    } else {
      r.finishReason = e.finishReason;
      r.cachedTokens = e.usage.cachedTokens;
      r.promptTokenIds = e.promptTokenIds;
    }
  }
  return r;
}

/** A progress bar on stderr for the long one-time steps (compiling the weights). */
class Progress {
  private bar: cliProgress.SingleBar | null = null;
  constructor(private readonly enabled: boolean) {}
  update(stage: string, done: number, total: number): void {
    if (!this.enabled || !process.stderr.isTTY) return;
    if (!this.bar) {
      this.bar = new cliProgress.SingleBar(
        { format: `${stage} [{bar}] {value}/{total}`, stream: process.stderr },
        cliProgress.Presets.shades_classic,
      );
      this.bar.start(total, 0);
    }
    this.bar.update(done);
  }
  stop(): void {
    this.bar?.stop();
    this.bar = null;
  }
}
