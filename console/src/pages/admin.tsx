/**
 * Admin (`/keys`): the API keys, through the admin API only, with the admin secret typed into the page: list them
 * with a sparkline of their daily tokens, create one (its key is shown once), edit limits, revoke.
 *
 * @module
 */
import { useCallback, useEffect, useState } from "preact/hooks";
import { AdminApi } from "../api/admin-api.ts";
import { type ApiError, asApiError } from "../api/api-error.ts";
import { type CreatedKey, type KeyInfo, type Limits, lastDays, type UsageReport } from "../api/types.ts";
import { Sparkline } from "../components/chart.tsx";
import { CopyButton } from "../components/copy-button.tsx";
import { ErrorNotice } from "../components/error-notice.tsx";
import { describeLimits, LimitsForm } from "../components/limits.tsx";
import { SecretField } from "../components/secret-field.tsx";
import { TYPING_PAUSE_MS, useSession } from "../session.ts";
import { dailyUsage, formatNumber } from "../usage-series.ts";

const SPARK_DAYS = 14;

export function Admin() {
  const [secret] = useSession("admin-secret");
  const [keys, setKeys] = useState<KeyInfo[] | null>(null);
  const [usage, setUsage] = useState<Record<string, UsageReport>>({});
  const [error, setError] = useState<ApiError | null>(null);
  const [busy, setBusy] = useState(false);
  const [created, setCreated] = useState<CreatedKey | null>(null);
  const [editing, setEditing] = useState<string | null>(null);
  const api = secret ? new AdminApi(secret) : null;

  const load = useCallback(async () => {
    if (!secret) return;
    const admin = new AdminApi(secret);
    try {
      const list = await admin.listKeys();
      setKeys(list);
      setError(null);
      const range = lastDays(SPARK_DAYS);
      const reports = await Promise.all(list.map((k) => admin.keyUsage(k.id, range)));
      setUsage(Object.fromEntries(reports.map((r) => [r.key_id, r])));
    } catch (e) {
      setError(asApiError(e));
    }
  }, [secret]);

  useEffect(() => {
    setKeys(null);
    setUsage({});
    setCreated(null);
    const timer = setTimeout(load, TYPING_PAUSE_MS);
    return () => clearTimeout(timer);
  }, [load]);

  /** Runs one admin action, then reloads the list; errors show above the table. */
  async function act(action: (admin: AdminApi) => Promise<unknown>) {
    if (!api) return;
    setBusy(true);
    try {
      await action(api);
      setError(null);
      await load();
    } catch (e) {
      setError(asApiError(e));
    } finally {
      setBusy(false);
    }
  }

  const create = (name: string, limits: Limits) =>
    act(async (admin) => setCreated(await admin.createKey(name, limits)));
  const update = (id: string, name: string, limits: Limits) =>
    act(async (admin) => {
      await admin.updateKey(id, { name, limits });
      setEditing(null);
    });
  const revoke = (k: KeyInfo) => {
    if (!confirm(`Revoke ${k.name || k.id} (${k.hint})? Requests with it fail with 401 at once.`)) return;
    act((admin) => admin.revokeKey(k.id));
  };

  return (
    <div class="admin">
      <SecretField
        label="Admin secret"
        session="admin-secret"
        placeholder="ADMIN_SECRET"
        help="Sent only as the bearer header of /admin calls; kept in this tab only (sessionStorage)."
      />
      <div class="row">
        <button type="button" class="secondary" disabled={!secret || busy} onClick={() => act(async () => {})}>
          Refresh
        </button>
      </div>
      <ErrorNotice error={error} />
      {created && (
        <section class="created" aria-labelledby="created-title">
          <h2 id="created-title">New key “{created.name || created.id}”</h2>
          <p>Copy it now: it is shown only this once, the gateway keeps only its hash.</p>
          <div class="row">
            <input aria-label="New API key" readOnly value={created.key} onFocus={(e) => e.currentTarget.select()} />
            <CopyButton text={created.key} label="Copy key" />
            <button type="button" class="secondary" onClick={() => setCreated(null)}>
              Done
            </button>
          </div>
        </section>
      )}
      {keys && (
        <>
          <LimitsForm legend="Create a key" submitLabel="Create key" busy={busy} onSubmit={create} />
          <KeyTable
            keys={keys}
            usage={usage}
            editing={editing}
            busy={busy}
            onEdit={setEditing}
            onUpdate={update}
            onRevoke={revoke}
          />
        </>
      )}
    </div>
  );
}

function KeyTable(props: {
  keys: KeyInfo[];
  usage: Record<string, UsageReport>;
  editing: string | null;
  busy: boolean;
  onEdit: (id: string | null) => void;
  onUpdate: (id: string, name: string, limits: Limits) => void;
  onRevoke: (k: KeyInfo) => void;
}) {
  return (
    <table class="keys">
      <caption>API keys ({props.keys.length})</caption>
      <thead>
        <tr>
          <th scope="col">Name</th>
          <th scope="col">Key</th>
          <th scope="col">Created</th>
          <th scope="col">Limits</th>
          <th scope="col">Tokens, last {SPARK_DAYS} days</th>
          <th scope="col">Actions</th>
        </tr>
      </thead>
      <tbody>
        {props.keys.map((k) => {
          const report = props.usage[k.id];
          const daily = report ? dailyUsage(report) : null;
          const total = report ? report.totals.prompt_tokens + report.totals.completion_tokens : null;
          return (
            <tr key={k.id} data-key-id={k.id} class={k.revoked_at ? "revoked" : ""}>
              <th scope="row">
                {k.name || <span class="help">(unnamed)</span>}
                <div class="help">{k.id}</div>
              </th>
              <td>
                <code>{k.hint}</code>
                {k.revoked_at && <div class="badge">revoked</div>}
              </td>
              <td>{new Date(k.created_at * 1000).toLocaleDateString()}</td>
              <td>
                {props.editing === k.id ? (
                  <LimitsForm
                    legend={`Edit ${k.name || k.id}`}
                    submitLabel="Save"
                    initial={{ name: k.name, limits: k.limits }}
                    busy={props.busy}
                    onSubmit={(name, limits) => props.onUpdate(k.id, name, limits)}
                    onCancel={() => props.onEdit(null)}
                  />
                ) : (
                  describeLimits(k.limits).join(" · ")
                )}
              </td>
              <td class="usage-cell">
                {daily && total !== null && (
                  <>
                    <Sparkline
                      days={daily.days}
                      values={daily.totalTokens}
                      label={`Tokens per day, last ${SPARK_DAYS} days: ${daily.totalTokens.join(", ")}`}
                    />
                    <span class="spark-total">
                      {formatNumber(total)} tokens, {formatNumber(report!.totals.requests)} requests
                    </span>
                  </>
                )}
              </td>
              <td>
                {!k.revoked_at && (
                  <div class="row">
                    <button
                      type="button"
                      class="secondary"
                      disabled={props.busy || props.editing === k.id}
                      onClick={() => props.onEdit(k.id)}
                    >
                      Edit<span class="visually-hidden"> {k.name || k.id}</span>
                    </button>
                    <button type="button" class="danger" disabled={props.busy} onClick={() => props.onRevoke(k)}>
                      Revoke<span class="visually-hidden"> {k.name || k.id}</span>
                    </button>
                  </div>
                )}
              </td>
            </tr>
          );
        })}
      </tbody>
    </table>
  );
}
