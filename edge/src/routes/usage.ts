/**
 * `GET /v1/usage?start_date=YYYY-MM-DD&end_date=YYYY-MM-DD`: a key reads its own usage ledger (per day and model:
 * requests, prompt, completion and cached tokens), its limits and its budget state. The admin API serves the
 * same report for any key at `GET /admin/keys/{id}/usage`. Dates are UTC, inclusive; the default is the last 30
 * days.
 *
 * @module
 */
import type { Context } from "hono";
import { Hono } from "hono";
import { errors } from "../errors.ts";
import { utcDate } from "../keys/key-limiter.ts";
import type { KeyStore } from "../keys/key-store.ts";
import { type AuthVars, requireKey } from "../middleware/auth.ts";
import { rateLimitHeaders } from "../rate-limit.ts";

const DATE = /^\d{4}-\d{2}-\d{2}$/;
const DEFAULT_DAYS = 30;

/** The date range of a usage query, validated. */
export function usageRange(c: Context): { start: string; end: string } {
  const now = Date.now();
  const end = c.req.query("end_date") ?? utcDate(now);
  const start = c.req.query("start_date") ?? utcDate(now - (DEFAULT_DAYS - 1) * 86_400_000);
  for (const [param, v] of [
    ["start_date", start],
    ["end_date", end],
  ] as const) {
    if (!DATE.test(v) || Number.isNaN(Date.parse(v))) {
      throw errors.invalidRequest(`Invalid '${param}': expected YYYY-MM-DD, got '${v}'.`, param, "invalid_value");
    }
  }
  if (start > end) throw errors.invalidRequest("'start_date' is after 'end_date'.", "start_date", "invalid_value");
  return { start, end };
}

export function usageRoute(deps: { keyStore: KeyStore }) {
  return new Hono<{ Variables: AuthVars }>().get("/", async (c) => {
    const key = await requireKey(c, deps.keyStore);
    const { start, end } = usageRange(c);
    const [report, rate] = await Promise.all([
      deps.keyStore.usage({ hash: c.get("keyHash") }, start, end),
      deps.keyStore.rateInfo(c.get("keyHash")),
    ]);
    if (!report) throw errors.invalidApiKey(c.get("keyHint"));
    return c.json(
      { ...report, key: { id: key.id, name: key.name, hint: key.hint, limits: key.limits } },
      200,
      rateLimitHeaders(rate),
    );
  });
}
