import { type DispatchEvent, type SubmitRequest, WorkerError } from "@llama-edge/shared";
import { describe, expect, it } from "vitest";
import type { Job, JobEvent, SubmitBackend } from "./job.ts";
import { runJob } from "./run-job.ts";

const job: Job = {
  id: "cmpl-1",
  keyHash: "k",
  reservationId: "r",
  model: "m",
  pools: ["default"],
  prompts: [
    { type: "tokens", token_ids: [1, 450] },
    { type: "tokens", token_ids: [1, 32_000] },
  ],
  n: 1,
  sampling: {},
  deadline: Date.now() + 60_000,
  estimatedPromptTokens: [2, 2],
  leaseMs: 60_000,
};

const settled: unknown[] = [];
const limiter = {
  admit: () => Promise.reject(new Error("not used")),
  settle: async (_k: string, _r: string, s: unknown) => void settled.push(s),
  renew: async () => true,
};

/**
 * Choice 0 streams; choice 1's worker refuses its prompt later: once the job's reader has seen a token (had one
 * gone out), or after 50 ms. The HTTP fuzzer (test/chaos/http-fuzz.test.ts) caught that order: a 200 whose
 * stream then carried a 400's error.
 */
function backend(readerSawToken: Promise<void>): SubmitBackend {
  return {
    async *submit(_pool: string, req: SubmitRequest): AsyncGenerator<DispatchEvent> {
      const base = { v: 1, id: req.id } as const;
      yield { ...base, seq: 0, type: "start", worker_id: "w", queue_ms: 0 } as DispatchEvent;
      if (req.id.endsWith("-1")) {
        await Promise.race([readerSawToken, new Promise((r) => setTimeout(r, 50))]);
        throw new WorkerError("bad_request", "prompt token id 32000 is outside the vocabulary", req.id);
      }
      yield { ...base, seq: 1, type: "delta", text: "a", token_ids: [7] } as DispatchEvent;
      yield { ...base, seq: 2, type: "delta", text: "b", token_ids: [8] } as DispatchEvent;
    },
  };
}

describe("runJob", () => {
  it("fails the whole job, before any token goes out, when a worker refuses one choice", async () => {
    const events: JobEvent[] = [];
    let sawToken = () => {};
    const readerSawToken = new Promise<void>((resolve) => {
      sawToken = resolve;
    });
    for await (const ev of runJob(job, { backend: backend(readerSawToken), limiter }, new AbortController().signal)) {
      events.push(ev);
      if (ev.type === "delta") sawToken();
    }
    expect(events.filter((e) => e.type === "delta")).toEqual([]);
    expect(events.at(-1)).toMatchObject({ type: "error", error: { status: 400, type: "invalid_request_error" } });
    expect(settled).toHaveLength(1);
  });
});
