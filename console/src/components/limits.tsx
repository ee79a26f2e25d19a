/**
 * A key's limits: shown as a list (Usage page, key table) and edited as a form (Admin page: create and edit).
 * Empty fields mean unlimited.
 *
 * @module
 */
import { useId, useState } from "preact/hooks";
import type { Limits } from "../api/types.ts";
import { formatNumber } from "../usage-series.ts";

export function describeLimits(l: Limits): string[] {
  const out: string[] = [];
  if (l.rpm !== null) out.push(`${formatNumber(l.rpm)} requests/min`);
  if (l.tpm !== null) out.push(`${formatNumber(l.tpm)} tokens/min`);
  if (l.max_concurrent !== null) out.push(`${formatNumber(l.max_concurrent)} at once`);
  if (l.budget) out.push(`${formatNumber(l.budget.tokens)} tokens per ${l.budget.period}`);
  if (l.models) out.push(`models: ${l.models.join(", ")}`);
  return out.length ? out : ["unlimited"];
}

interface Draft {
  rpm: string;
  tpm: string;
  max_concurrent: string;
  budget_tokens: string;
  budget_period: "day" | "month";
  models: string;
}

const str = (n: number | null | undefined) => (n === null || n === undefined ? "" : String(n));

function draftOf(l: Limits | undefined): Draft {
  return {
    rpm: str(l?.rpm),
    tpm: str(l?.tpm),
    max_concurrent: str(l?.max_concurrent),
    budget_tokens: str(l?.budget?.tokens),
    budget_period: l?.budget?.period ?? "month",
    models: l?.models?.join(", ") ?? "",
  };
}

/** Every limit, with null for the empty fields: the admin API merges, so this also clears what was emptied. */
function limitsOf(d: Draft): Limits {
  const n = (v: string) => (v.trim() === "" ? null : Number(v));
  const models = d.models
    .split(",")
    .map((m) => m.trim())
    .filter(Boolean);
  const budget = n(d.budget_tokens);
  return {
    rpm: n(d.rpm),
    tpm: n(d.tpm),
    max_concurrent: n(d.max_concurrent),
    budget: budget === null ? null : { tokens: budget, period: d.budget_period },
    models: models.length ? models : null,
  };
}

/** The limits form; `onSubmit` gets the name and every limit. */
export function LimitsForm(props: {
  legend: string;
  submitLabel: string;
  initial?: { name: string; limits: Limits };
  busy: boolean;
  onSubmit: (name: string, limits: Limits) => void;
  onCancel?: () => void;
}) {
  const [name, setName] = useState(props.initial?.name ?? "");
  const [draft, setDraft] = useState<Draft>(() => draftOf(props.initial?.limits));
  const id = useId();
  const input = (key: keyof Draft) => ({
    id: `${id}-${key}`,
    value: draft[key],
    onInput: (e: Event) => setDraft({ ...draft, [key]: (e.currentTarget as HTMLInputElement).value }),
  });
  const count = { type: "number", min: 1, step: 1, placeholder: "unlimited" } as const;
  return (
    <form
      class="limits-form"
      onSubmit={(e) => {
        e.preventDefault();
        props.onSubmit(name, limitsOf(draft));
      }}
    >
      <fieldset>
        <legend>{props.legend}</legend>
        <div class="field">
          <label for={`${id}-name`}>Name</label>
          <input id={`${id}-name`} value={name} maxLength={200} onInput={(e) => setName(e.currentTarget.value)} />
        </div>
        <div class="field">
          <label for={`${id}-rpm`}>Requests per minute</label>
          <input {...count} {...input("rpm")} />
        </div>
        <div class="field">
          <label for={`${id}-tpm`}>Tokens per minute</label>
          <input {...count} {...input("tpm")} />
        </div>
        <div class="field">
          <label for={`${id}-max_concurrent`}>Concurrent requests</label>
          <input {...count} {...input("max_concurrent")} />
        </div>
        <div class="field">
          <label for={`${id}-budget_tokens`}>Token budget</label>
          <input {...count} {...input("budget_tokens")} />
        </div>
        <div class="field">
          <label for={`${id}-budget_period`}>Budget period</label>
          <select {...input("budget_period")}>
            <option value="day">per day (UTC)</option>
            <option value="month">per month (UTC)</option>
          </select>
        </div>
        <div class="field">
          <label for={`${id}-models`}>Allowed models (comma-separated)</label>
          <input {...input("models")} placeholder="all models" />
        </div>
        <div class="row">
          <button type="submit" disabled={props.busy}>
            {props.submitLabel}
          </button>
          {props.onCancel && (
            <button type="button" class="secondary" onClick={props.onCancel}>
              Cancel
            </button>
          )}
        </div>
      </fieldset>
    </form>
  );
}
