/**
 * Usage (`/usage`): the key in use, from `GET /v1/usage`: tokens and requests per day as charts and a table, the
 * key's limits, what its rate limits leave now (the response's x-ratelimit-* headers), its budget, and the 429s
 * this tab received.
 *
 * @module
 */
import { useEffect, useId, useState } from "preact/hooks";
import { type ApiError, asApiError } from "../api/api-error.ts";
import { PublicApi } from "../api/public-api.ts";
import { lastDays, type OwnUsageReport, type RateState, type RateWindow } from "../api/types.ts";
import { BarChart } from "../components/chart.tsx";
import { ErrorNotice } from "../components/error-notice.tsx";
import { describeLimits } from "../components/limits.tsx";
import { SecretField } from "../components/secret-field.tsx";
import { recent429s, TYPING_PAUSE_MS, useSession } from "../session.ts";
import { dailyUsage, formatNumber } from "../usage-series.ts";

const RANGES = [7, 30, 90];

export function Usage() {
  const [apiKey] = useSession("api-key");
  const [days, setDays] = useState(30);
  const [data, setData] = useState<{ report: OwnUsageReport; rate: RateState } | null>(null);
  const [error, setError] = useState<ApiError | null>(null);
  const [refresh, setRefresh] = useState(0);
  const rangeId = useId();

  useEffect(() => {
    setData(null);
    setError(null);
    if (!apiKey) return;
    let live = true;
    const timer = setTimeout(() => {
      new PublicApi(apiKey)
        .usage(lastDays(days))
        .then((d) => live && setData(d))
        .catch((e) => live && setError(asApiError(e)));
    }, TYPING_PAUSE_MS);
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [apiKey, days, refresh]);

  return (
    <div class="usage">
      <SecretField
        label="API key"
        session="api-key"
        placeholder="sk-…"
        help="The usage shown is this key's own. Kept in this tab only (sessionStorage)."
      />
      <div class="row">
        <label for={rangeId}>Range</label>
        <select id={rangeId} value={days} onChange={(e) => setDays(Number(e.currentTarget.value))}>
          {RANGES.map((d) => (
            <option key={d} value={d}>
              last {d} days
            </option>
          ))}
        </select>
        <button type="button" class="secondary" disabled={!apiKey} onClick={() => setRefresh(refresh + 1)}>
          Refresh
        </button>
      </div>
      <ErrorNotice error={error} />
      {!apiKey && <p class="help">Enter an API key to see its usage.</p>}
      {data && <Report report={data.report} rate={data.rate} />}
      <Recent429s />
    </div>
  );
}

function Report({ report, rate }: { report: OwnUsageReport; rate: RateState }) {
  const daily = dailyUsage(report);
  const t = report.totals;
  return (
    <>
      <section aria-labelledby="key-title">
        <h2 id="key-title">
          Key {report.key.name ? `“${report.key.name}”` : ""} <code>{report.key.hint}</code>
        </h2>
        <dl class="facts">
          <dt>Limits</dt>
          <dd>{describeLimits(report.key.limits).join(" · ")}</dd>
          <dt>Requests left now</dt>
          <dd data-testid="remaining-requests">{remaining(rate.requests, "requests")}</dd>
          <dt>Tokens left now</dt>
          <dd data-testid="remaining-tokens">{remaining(rate.tokens, "tokens")}</dd>
          <dt>Budget</dt>
          <dd>
            {report.budget
              ? `${formatNumber(report.budget.used)} used + ${formatNumber(report.budget.reserved)} reserved of ${formatNumber(report.budget.tokens)} tokens this ${report.budget.period}`
              : "none"}
          </dd>
        </dl>
      </section>
      <section aria-labelledby="totals-title">
        <h2 id="totals-title">
          {report.start_date} to {report.end_date} (UTC)
        </h2>
        <dl class="totals" aria-label="Totals">
          <Total label="Requests" value={t.requests} />
          <Total label="Prompt tokens" value={t.prompt_tokens} />
          <Total label="Completion tokens" value={t.completion_tokens} />
          <Total label="Cached prompt tokens" value={t.cached_tokens} />
        </dl>
        <BarChart
          title="Tokens per day"
          days={daily.days}
          series={[
            { label: "prompt", values: daily.promptTokens, color: "#1d4ed8" },
            { label: "completion", values: daily.completionTokens, color: "#b45309" },
          ]}
        />
        <BarChart
          title="Requests per day"
          days={daily.days}
          series={[{ label: "requests", values: daily.requests, color: "#047857" }]}
        />
        <table>
          <caption>By day and model</caption>
          <thead>
            <tr>
              <th scope="col">Day</th>
              <th scope="col">Model</th>
              <th scope="col">Requests</th>
              <th scope="col">Prompt tokens</th>
              <th scope="col">Completion tokens</th>
              <th scope="col">Cached</th>
            </tr>
          </thead>
          <tbody>
            {report.data.length === 0 && (
              <tr>
                <td colSpan={6}>No requests in this range.</td>
              </tr>
            )}
            {report.data.map((r) => (
              <tr key={`${r.date} ${r.model}`}>
                <td>{r.date}</td>
                <td>{r.model}</td>
                <td>{formatNumber(r.requests)}</td>
                <td>{formatNumber(r.prompt_tokens)}</td>
                <td>{formatNumber(r.completion_tokens)}</td>
                <td>{formatNumber(r.cached_tokens)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </section>
    </>
  );
}

function Total({ label, value }: { label: string; value: number }) {
  return (
    <div>
      <dt>{label}</dt>
      <dd>{formatNumber(value)}</dd>
    </div>
  );
}

function remaining(w: RateWindow | undefined, what: string): string {
  if (!w) return `no ${what}-per-minute limit`;
  return `${formatNumber(w.remaining)} of ${formatNumber(w.limit)} per minute (full again in ${w.reset})`;
}

function Recent429s() {
  const seen = recent429s();
  return (
    <section aria-labelledby="r429-title">
      <h2 id="r429-title">Recent 429s in this tab</h2>
      <p class="help">The API does not list past refusals; these are the ones this browser tab received.</p>
      {seen.length === 0 ? (
        <p>None.</p>
      ) : (
        <ul>
          {seen.map((s) => (
            <li key={s.at}>
              {new Date(s.at).toLocaleTimeString()}: {s.code ?? "429"}: {s.message}
              {s.retryAfterS !== null && ` (retry after ${s.retryAfterS} s)`}
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}
