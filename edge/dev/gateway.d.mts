import type { StdioOptions } from "node:child_process";

export interface GatewayOptions {
  /** nats-server WebSocket listener, e.g. ws://127.0.0.1:4223. */
  natsWsUrl: string;
  /** Default: a free port. */
  port?: number;
  /** Default: a random one (pass a persistent one to keep using the admin API across restarts). */
  adminSecret?: string;
  /** Durable Object storage directory. Default: <repo>/.cache/edge/state. */
  persistTo?: string;
  /** GATEWAY_CONFIG (pools and models); default: wrangler.jsonc's. */
  config?: { pools: Record<string, { max_context: number; models: string[] }>; [k: string]: unknown };
  shards?: number;
  logLevel?: "debug" | "info" | "log" | "warn" | "error" | "none";
  stdio?: StdioOptions;
  /** "wrangler" (default): `wrangler dev`. "miniflare": the bundled gateway on workerd without wrangler's
   *  development proxy (stdio, logLevel and the inspector do not apply). */
  runtime?: "wrangler" | "miniflare";
  timeoutMs?: number;
}

export interface Gateway {
  url: string;
  port: number;
  adminSecret: string;
  stop(): Promise<void>;
}
export function persistentSecret(file: string): string;
export function startGateway(opts: GatewayOptions): Promise<Gateway>;
export function admin(gw: Gateway, method: string, path: string, body?: unknown): Promise<Record<string, unknown>>;
export function ensureDevKey(gw: Gateway, file: string): Promise<string>;
