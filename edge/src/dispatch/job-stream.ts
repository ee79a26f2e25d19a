/**
 * A job as a byte stream of NDJSON events: what a dispatch shard returns over RPC. The loop here (not the reader)
 * drives `runJob`, so the job runs to its end and settles whatever the reader does. Cancelling the stream cancels
 * the job.
 *
 * NOTE on slow readers. Workers push events as fast as they generate them (the protocol has no flow control), so
 * a reader that falls behind makes the events pile up here, in the shard shared with every other job on it. The
 * stream is pulled (a read asks for what is buffered), so this module sees the reader's pace: events wait in a
 * buffer bounded by `maxBufferedBytes`, and a reader that takes nothing for `idleReaderMs` while events wait, or
 * lets the buffer overflow, has its job cancelled at the workers. Its usage is settled as for any cancel.
 *
 * @module
 */
import { CancelledError } from "@llama-edge/shared";
import { decodeEvents, encodeEvent, type Job, type JobEvent, type JobRunner } from "./job.ts";
import { type RunJobDeps, runJob, toErrorInfo } from "./run-job.ts";

/** What a reader may leave unread, and for how long. */
export interface ReaderLimits {
  maxBufferedBytes: number;
  idleReaderMs: number;
}

export const DEFAULT_READER_LIMITS: ReaderLimits = { maxBufferedBytes: 1024 * 1024, idleReaderMs: 30_000 };

/** The abort reason of a job whose reader fell behind. */
export class SlowReaderError extends CancelledError {}

export function jobStream(
  job: Job,
  deps: RunJobDeps,
  ac = new AbortController(),
  onEnd?: () => void,
): ReadableStream<Uint8Array> {
  const { maxBufferedBytes, idleReaderMs } = job.reader ?? DEFAULT_READER_LIMITS;
  let buffered: Uint8Array[] = [];
  let bytes = 0;
  let ended = false;
  let dropped = false; // cancelled for a slow reader: nothing more is buffered
  let cancelled = false;
  let wake: (() => void) | undefined;
  let idle: ReturnType<typeof setTimeout> | undefined;

  const dropReader = (why: string) => {
    if (dropped) return;
    dropped = true;
    deps.log?.(`job ${job.id}: cancelled, ${why}`, undefined);
    ac.abort(new SlowReaderError(why, job.id));
    // A reader that comes back finds why its answer stops here.
    const error = {
      status: 408,
      message: `The response was not read in time (${why}).`,
      type: "invalid_request_error",
      param: null,
      code: "slow_reader",
    };
    buffered = [encodeEvent({ type: "error", error })];
    bytes = buffered[0]!.byteLength;
    wake?.();
  };
  const push = (ev: JobEvent) => {
    if (cancelled || dropped) return;
    const chunk = encodeEvent(ev);
    buffered.push(chunk);
    bytes += chunk.byteLength;
    if (bytes > maxBufferedBytes) return dropReader(`more than ${maxBufferedBytes} bytes were left unread`);
    idle ??= setTimeout(() => dropReader(`nothing was read for ${idleReaderMs} ms`), idleReaderMs);
    wake?.();
  };

  void (async () => {
    try {
      for await (const ev of runJob(job, deps, ac.signal)) push(ev);
    } catch (e) {
      deps.log?.(`job ${job.id} failed`, e);
      push({ type: "error", error: toErrorInfo(e) });
    } finally {
      ended = true;
      wake?.();
      onEnd?.();
    }
  })();

  return new ReadableStream<Uint8Array>(
    {
      // Called only when the reader asks (highWaterMark 0): a pull is the reader keeping up.
      async pull(controller) {
        if (idle !== undefined) clearTimeout(idle);
        idle = undefined;
        while (buffered.length === 0 && !ended) {
          await new Promise<void>((resolve) => {
            wake = resolve;
          });
          wake = undefined;
        }
        if (buffered.length > 0) {
          const chunk = concat(buffered, bytes);
          buffered = [];
          bytes = 0;
          controller.enqueue(chunk);
        } else {
          controller.close();
        }
        if (dropped) controller.close();
      },
      cancel(reason) {
        cancelled = true;
        if (idle !== undefined) clearTimeout(idle);
        ac.abort(new CancelledError(`the reader cancelled: ${String(reason)}`, job.id));
      },
    },
    { highWaterMark: 0 },
  );
}

function concat(parts: Uint8Array[], size: number): Uint8Array {
  if (parts.length === 1) return parts[0]!;
  const out = new Uint8Array(size);
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.byteLength;
  }
  return out;
}

/** Runs jobs in this isolate (tests, single-process setups); production uses the dispatch shards. */
export class LocalJobRunner implements JobRunner {
  constructor(private readonly deps: RunJobDeps) {}

  run(job: Job, signal: AbortSignal): AsyncIterable<JobEvent> {
    return decodeEvents(jobStream(job, this.deps), signal);
  }
}
