/**
 * Usage reports as daily series: the API has one row per day and model, only for days with traffic; charts want
 * every day of the range, models summed.
 *
 * @module
 */
import type { UsageCounters, UsageReport } from "./api/types.ts";

export interface DailyUsage {
  /** Every day of the report's range, YYYY-MM-DD. */
  days: string[];
  requests: number[];
  promptTokens: number[];
  completionTokens: number[];
  /** Prompt + completion tokens. */
  totalTokens: number[];
}

export function daysBetween(start: string, end: string): string[] {
  const days: string[] = [];
  for (let t = Date.parse(`${start}T00:00:00Z`); t <= Date.parse(`${end}T00:00:00Z`); t += 86_400_000) {
    days.push(new Date(t).toISOString().slice(0, 10));
  }
  return days;
}

export function dailyUsage(report: UsageReport): DailyUsage {
  const days = daysBetween(report.start_date, report.end_date);
  const byDay = new Map<string, UsageCounters>();
  for (const row of report.data) {
    const c = byDay.get(row.date) ?? { requests: 0, prompt_tokens: 0, completion_tokens: 0, cached_tokens: 0 };
    c.requests += row.requests;
    c.prompt_tokens += row.prompt_tokens;
    c.completion_tokens += row.completion_tokens;
    c.cached_tokens += row.cached_tokens;
    byDay.set(row.date, c);
  }
  const pick = (f: (c: UsageCounters) => number) => days.map((d) => (byDay.has(d) ? f(byDay.get(d)!) : 0));
  return {
    days,
    requests: pick((c) => c.requests),
    promptTokens: pick((c) => c.prompt_tokens),
    completionTokens: pick((c) => c.completion_tokens),
    totalTokens: pick((c) => c.prompt_tokens + c.completion_tokens),
  };
}

/** 12345 -> "12,345" */
export const formatNumber = (n: number) => n.toLocaleString("en-US");
