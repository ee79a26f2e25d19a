/**
 * Requests answered, by route and status (`llama_gateway_requests_total`). Each isolate counts the answers it
 * gives and hands them to a `RequestCounterStore` (Durable Objects in production, so counts outlive isolates)
 * after the response is sent, in `waitUntil`: counting never delays an answer. Counts that a failed hand-over
 * could not store stay pending and go with the next request's.
 *
 * @module
 */
import type { MiddlewareHandler } from "hono";
import { routePath } from "hono/route";

/** Counts per series; a series is `seriesKey(route, status)`. */
export type RequestCounts = Record<string, number>;

export interface RequestCounterStore {
  /** Adds `counts` to the stored totals. */
  add(counts: RequestCounts): Promise<void>;
  /** The stored totals, over every isolate that ever counted. */
  counts(): Promise<RequestCounts>;
}

export const seriesKey = (route: string, status: number | string): string => JSON.stringify([route, String(status)]);

export function parseSeriesKey(key: string): { route: string; status: string } {
  const [route, status] = JSON.parse(key) as [string, string];
  return { route, status };
}

/**
 * Counts each answer under the route pattern it matched (`/v1/chat/completions`, `/admin/keys/:id`; `*` or
 * `/v1/*` for paths no route has), so labels stay few whatever paths clients send. The status is the response's:
 * a stream that fails after its first token was a 200.
 */
export function countRequests(store: RequestCounterStore): MiddlewareHandler {
  const pending = new Map<string, number>();
  const addTo = (m: Map<string, number>, k: string, n: number) => m.set(k, (m.get(k) ?? 0) + n);

  async function flush(): Promise<void> {
    if (pending.size === 0) return; // another request's flush took these counts along
    const batch = Object.fromEntries(pending);
    pending.clear();
    try {
      await store.add(batch);
    } catch (e) {
      for (const [k, n] of Object.entries(batch)) addTo(pending, k, n);
      console.error("request counts not stored (kept for the next request's hand-over)", e);
    }
  }

  return async function countRequest(c, next) {
    await next();
    addTo(pending, seriesKey(routePath(c, -1), c.res.status), 1);
    const stored = flush();
    try {
      c.executionCtx.waitUntil(stored);
    } catch {
      // no ExecutionContext (app.request() in tests): the hand-over runs on its own
    }
  };
}
