/**
 * A model download's progress for people: a cli-progress bar on a terminal, and on anything else (container logs)
 * a line every few seconds with the bytes, the share done and the rate.
 *
 * @module
 */
import cliProgress from "cli-progress";
import type { DownloadProgress } from "./hub.ts";

export interface ProgressLogFields {
  repo: string;
  bytes: number;
  total_bytes: number;
  bytes_per_second: number;
}

export interface DownloadProgressReporter {
  update(p: DownloadProgress): void;
  /** Clears the bar (a terminal) or logs the last line; safe to call more than once. */
  done(): void;
}

export function downloadProgressReporter(opts: {
  /** Draw a bar on `stream` (a terminal) instead of logging. */
  tty: boolean;
  log: (message: string, fields: ProgressLogFields) => void;
  /** Between log lines. Default 10 s. */
  intervalMs?: number;
  stream?: NodeJS.WriteStream;
}): DownloadProgressReporter {
  const started = Date.now();
  const intervalMs = opts.intervalMs ?? 10_000;
  let last: DownloadProgress | undefined;
  let lastLogAt = 0;
  let bar: cliProgress.SingleBar | undefined;
  let finished = false;

  const rate = (p: DownloadProgress) => p.bytes / Math.max(0.001, (Date.now() - started) / 1000);
  const fields = (p: DownloadProgress): ProgressLogFields => ({
    repo: p.repo,
    bytes: p.bytes,
    total_bytes: p.totalBytes,
    bytes_per_second: Math.round(rate(p)),
  });
  const line = (p: DownloadProgress) =>
    `downloading ${p.repo}: ${formatBytes(p.bytes)} of ${formatBytes(p.totalBytes)} (${percent(p)} %), ` +
    `${formatBytes(rate(p))}/s`;

  return {
    update(p) {
      if (finished) return;
      last = p;
      if (opts.tty) {
        if (!bar) {
          bar = new cliProgress.SingleBar(
            {
              stream: opts.stream ?? process.stderr,
              format: `downloading ${p.repo} [{bar}] {percentage}% | {done} of {size} | {speed}/s | {file}`,
              hideCursor: true,
              clearOnComplete: true,
            },
            cliProgress.Presets.shades_classic,
          );
          bar.start(Math.max(1, p.totalBytes), 0);
        }
        if (bar.getTotal() !== p.totalBytes && p.totalBytes > 0) bar.setTotal(p.totalBytes);
        bar.update(p.bytes, {
          done: formatBytes(p.bytes),
          size: formatBytes(p.totalBytes),
          speed: formatBytes(rate(p)),
          file: p.file,
        });
        return;
      }
      const now = Date.now();
      if (lastLogAt === 0 || now - lastLogAt >= intervalMs) {
        lastLogAt = now;
        opts.log(line(p), fields(p));
      }
    },
    done() {
      if (finished) return;
      finished = true;
      bar?.stop();
      if (!opts.tty && last && lastLogAt !== 0) opts.log(line(last), fields(last));
    },
  };
}

const percent = (p: DownloadProgress) => (p.totalBytes > 0 ? Math.floor((100 * p.bytes) / p.totalBytes) : 0);

export function formatBytes(n: number): string {
  if (n < 1024) return `${Math.round(n)} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}
