/**
 * `GET /metrics`: the gateway's Prometheus metrics, behind the admin API's bearer secret (they name keys). Every
 * count lives in Durable Objects, so any isolate answers with the totals of all of them:
 *
 *   llama_gateway_requests_total{route, status}          answers given (metrics/request-counts.ts)
 *   llama_gateway_rate_limited_total{key, limit}          429s by the key's limit that refused (rpm, tpm,
 *                                                         max_concurrent, budget), counted by the key's object
 *   llama_gateway_tokens_total{key, model, kind}          tokens settled, kind prompt|completion: the key's ledger
 *   llama_gateway_key_info{key, name, revoked}            1 per key: its name, to join on `key`
 *
 * `key` is the key's id (`key_…`), never the key itself. A scrape costs one call to each request counter shard,
 * one to the key directory and one to each key's object.
 *
 * @module
 */
import { Hono, type MiddlewareHandler } from "hono";
import { REFUSING_LIMITS } from "../keys/key-limiter.ts";
import type { KeyStore } from "../keys/key-store.ts";
import { EXPOSITION_CONTENT_TYPE, exposition, type MetricFamily } from "../metrics/exposition.ts";
import { parseSeriesKey, type RequestCounterStore } from "../metrics/request-counts.ts";

export function metricsRoute(deps: { keyStore: KeyStore; requests: RequestCounterStore; auth: MiddlewareHandler }) {
  return new Hono().use(deps.auth).get("/", async (c) => {
    const [requests, keys] = await Promise.all([deps.requests.counts(), deps.keyStore.counters()]);
    const families: MetricFamily[] = [
      {
        name: "llama_gateway_requests_total",
        help: "HTTP requests answered by the gateway, by route pattern and status code.",
        type: "counter",
        samples: Object.entries(requests)
          .map(([series, value]) => ({ labels: parseSeriesKey(series), value }))
          .sort(
            (a, b) => a.labels.route.localeCompare(b.labels.route) || a.labels.status.localeCompare(b.labels.status),
          ),
      },
      {
        name: "llama_gateway_rate_limited_total",
        help: "Requests refused with 429 by a key's limit: rpm, tpm, max_concurrent or budget.",
        type: "counter",
        samples: keys.flatMap(({ info, counters }) =>
          REFUSING_LIMITS.map((limit) => ({ labels: { key: info.id, limit }, value: counters.refused[limit] })),
        ),
      },
      {
        name: "llama_gateway_tokens_total",
        help: "Tokens used by each key (its usage ledger), by model; kind prompt or completion.",
        type: "counter",
        samples: keys.flatMap(({ info, counters }) =>
          Object.entries(counters.tokens).flatMap(([model, t]) => [
            { labels: { key: info.id, model, kind: "prompt" }, value: t.prompt_tokens },
            { labels: { key: info.id, model, kind: "completion" }, value: t.completion_tokens },
          ]),
        ),
      },
      {
        name: "llama_gateway_key_info",
        help: "One per API key, with its name: join on key.",
        type: "gauge",
        samples: keys.map(({ info }) => ({
          labels: { key: info.id, name: info.name, revoked: String(info.revoked_at !== null) },
          value: 1,
        })),
      },
    ];
    return c.body(exposition(families), 200, { "content-type": EXPOSITION_CONTENT_TYPE });
  });
}
