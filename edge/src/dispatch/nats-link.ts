/**
 * The gateway's NATS connection, over WebSocket (`wsconnect`: workerd has no TCP sockets for NATS' protocol to
 * use here, and the WebSocket transport uses only web-standard APIs). Connects lazily, reconnects forever, and
 * feeds every pool's load reports to `onLoadReport`. Lives inside a dispatch shard Durable Object: see
 * durable/dispatch-shard.ts for why.
 *
 * @module
 */
import { Dispatcher, type LoadReport, NoWorkersError, parseLoadReport } from "@llama-edge/shared";
import { type NatsConnection, wsconnect } from "@nats-io/nats-core";

export interface NatsLinkOptions {
  /** ws:// or wss:// URL of the nats-server WebSocket listener. */
  url: string;
  token?: string;
  user?: string;
  pass?: string;
  onLoadReport(report: LoadReport, directSubject: string | undefined): void;
  /** Bound on the first connection (NoWorkersError after). Default 10000: a burst of requests arriving at a cold
   *  shard keeps its thread busy while the WebSocket handshake waits its turn (2 s failed 500 cold streams). */
  connectTimeoutMs?: number;
}

export interface Connected {
  nc: NatsConnection;
  dispatcher: Dispatcher;
}

/** Every pool's load reports (`llama.pool.<pool>.load`). */
const LOAD_SUBJECT = "llama.pool.*.load";

/**
 * Why `url` must not carry these credentials, if it must not: NATS' token and password travel in the CONNECT
 * message as they are, so over plaintext `ws://` anyone on the path reads them. Loopback never leaves the host.
 */
export function plaintextCredentialsProblem(url: string, hasCredentials: boolean): string | undefined {
  if (!hasCredentials) return undefined;
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return `NATS_URL ${JSON.stringify(url)} is not a URL`;
  }
  if (parsed.protocol !== "ws:") return undefined;
  const host = parsed.hostname.replace(/^\[|\]$/g, "");
  const loopback = host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
  return loopback
    ? undefined
    : `refusing to send NATS credentials over plaintext ws:// to ${parsed.host}: use a wss:// URL`;
}

export class NatsLink {
  readonly #o: NatsLinkOptions;
  #conn: Promise<Connected> | undefined;
  /** Set when the options must not be used to connect (see plaintextCredentialsProblem). */
  readonly #refusal: string | undefined;

  constructor(opts: NatsLinkOptions) {
    this.#o = opts;
    this.#refusal = plaintextCredentialsProblem(opts.url, Boolean(opts.token || opts.user || opts.pass));
    if (this.#refusal) console.error(this.#refusal);
  }

  /** The connection, connecting first if needed. Rejects with NoWorkersError when NATS cannot be reached. */
  get(requestId = "-"): Promise<Connected> {
    if (this.#refusal) return Promise.reject(new NoWorkersError(this.#refusal, requestId));
    if (!this.#conn) {
      const p = this.#connect();
      this.#conn = p;
      p.then(
        ({ nc }) => void nc.closed().then(() => this.#forget(p)),
        () => this.#forget(p),
      );
    }
    return this.#conn.catch((e) => {
      throw new NoWorkersError(`cannot reach NATS at ${this.#o.url}: ${(e as Error).message}`, requestId, { cause: e });
    });
  }

  #forget(p: Promise<Connected>): void {
    if (this.#conn === p) this.#conn = undefined;
  }

  async #connect(): Promise<Connected> {
    const { url, token, user, pass } = this.#o;
    const nc = await wsconnect({
      servers: url,
      name: "llama-edge-gateway",
      ...(token ? { token } : {}),
      ...(user ? { user, pass } : {}),
      timeout: this.#o.connectTimeoutMs ?? 10_000,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 250,
    });
    nc.subscribe(LOAD_SUBJECT, {
      callback: (err, msg) => {
        if (err) return;
        const parsed = parseLoadReport(msg.data);
        if (parsed.ok) this.#o.onLoadReport(parsed.value, directSubjectOf(parsed.value));
      },
    });
    // JetStream calls (pool check, publish) get the same patience: an answer slowed by a burst is not a dead pool
    // (a missing pool is an immediate "not found", whatever the timeout).
    return { nc, dispatcher: new Dispatcher(nc, { poolCheckTimeoutMs: 10_000 }) };
  }

  async close(): Promise<void> {
    const conn = this.#conn;
    this.#conn = undefined;
    await conn?.then(({ nc }) => nc.close()).catch(() => {});
  }
}

/** A load report's `direct_subject`, when it is a plain subject (no wildcards or spaces) we may publish to. */
function directSubjectOf(report: LoadReport): string | undefined {
  const s = report.direct_subject;
  return s !== undefined && /^[^\s*>]+$/.test(s) ? s : undefined;
}
