/**
 * Prometheus' text exposition format (version 0.0.4), which every Prometheus-compatible scraper reads: a `# HELP`
 * and `# TYPE` line per family, then one line per sample. Families are written even without samples, so that a
 * scraper (and the monitoring test) sees every metric the gateway exports from its first scrape.
 *
 * @see https://prometheus.io/docs/instrumenting/exposition_formats/
 * @module
 */

export const EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

export interface Sample {
  labels: Record<string, string>;
  value: number;
}

export interface MetricFamily {
  /** snake_case, with `_total` on counters (Prometheus' naming conventions). */
  name: string;
  help: string;
  type: "counter" | "gauge";
  samples: Sample[];
}

const escapeHelp = (s: string): string => s.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");
const escapeLabel = (s: string): string => escapeHelp(s).replace(/"/g, '\\"');

function sampleLine(name: string, { labels, value }: Sample): string {
  const pairs = Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`);
  return `${name}${pairs.length > 0 ? `{${pairs.join(",")}}` : ""} ${value}`;
}

export function exposition(families: MetricFamily[]): string {
  const lines: string[] = [];
  for (const f of families) {
    lines.push(`# HELP ${f.name} ${escapeHelp(f.help)}`, `# TYPE ${f.name} ${f.type}`);
    for (const s of f.samples) lines.push(sampleLine(f.name, s));
  }
  return `${lines.join("\n")}\n`;
}
