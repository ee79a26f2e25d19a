/**
 * What a job has used so far, from its events: completion tokens counted per choice from deltas (or a choice's
 * final usage once it arrives), prompt tokens once per prompt whatever `n` (as OpenAI bills), from a worker's
 * final event, else from the admission estimate if the prompt was processed (tokens came out of it).
 *
 * The dispatch shard keeps one to settle and renew the job's reservation; the gateway keeps one of the events it
 * relayed, to settle should the shard die mid-stream.
 *
 * @module
 */
import type { Usage } from "@llama-edge/shared";
import type { Job } from "./job.ts";

interface ChoiceUsage {
  promptIndex: number;
  /** Completion tokens seen in deltas: the count until a final event says. */
  numTokens: number;
  usage?: Usage;
}

export class UsageTally {
  readonly #choices: ChoiceUsage[];
  readonly #estimatedPromptTokens: number[];
  readonly #numPrompts: number;

  constructor(job: Pick<Job, "prompts" | "n" | "estimatedPromptTokens">) {
    this.#numPrompts = job.prompts.length;
    this.#estimatedPromptTokens = job.estimatedPromptTokens;
    this.#choices = Array.from({ length: job.prompts.length * job.n }, (_, i) => ({
      promptIndex: Math.floor(i / job.n),
      numTokens: 0,
    }));
  }

  /** Choice `index` produced `numTokens` more completion tokens. */
  delta(index: number, numTokens: number): void {
    const c = this.#choices[index];
    if (c) c.numTokens += numTokens;
  }

  /** Choice `index` ended; `usage` is the worker's exact count. */
  final(index: number, usage: Usage): void {
    const c = this.#choices[index];
    if (c) c.usage = usage;
  }

  total(): Usage {
    const usage: Usage = { prompt_tokens: 0, completion_tokens: 0, cached_tokens: 0 };
    for (let p = 0; p < this.#numPrompts; p++) {
      const mine = this.#choices.filter((c) => c.promptIndex === p);
      const reported = mine.find((c) => c.usage)?.usage;
      if (reported) {
        usage.prompt_tokens += reported.prompt_tokens;
        usage.cached_tokens += reported.cached_tokens;
      } else if (mine.some((c) => c.numTokens > 0)) {
        usage.prompt_tokens += this.#estimatedPromptTokens[p] ?? 0;
      }
    }
    for (const c of this.#choices) usage.completion_tokens += c.usage?.completion_tokens ?? c.numTokens;
    return usage;
  }
}
