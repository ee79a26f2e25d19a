/**
 * The NATS Helm values (infra/k8s/nats/values.yaml), the nats-server configuration the chart renders from them,
 * and the subjects each side of the dispatch protocol touches.
 *
 * @module
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { type PoolNames, poolNames } from "@llama-edge/shared";
import { k8sDir, type Manifest, parseYaml } from "./k8s.ts";

export interface Permissions {
  publish?: { allow?: string[]; deny?: string[] };
  subscribe?: { allow?: string[]; deny?: string[] };
  allow_responses?: boolean | { max?: number; expires?: string };
}

export interface NatsUser {
  user: string;
  password: string;
  permissions?: Permissions;
}

// biome-ignore lint/suspicious/noExplicitAny: Helm values are free-form; the tests check the parts they rely on
type Any = any;

export interface NatsValues {
  config: {
    cluster: { enabled: boolean; replicas: number };
    jetstream: Any;
    websocket: Any;
    monitor: { enabled: boolean; port: number; tls?: { enabled?: boolean } };
    nats?: { port?: number };
    merge: {
      max_payload?: string | number;
      system_account?: string;
      accounts: Record<string, { jetstream?: string | boolean; users: NatsUser[] }>;
      [k: string]: Any;
    };
  };
  container: { env: Record<string, Any>; merge?: Any };
  extraResources?: Manifest[];
  [k: string]: Any;
}

export function natsValues(): NatsValues {
  return parseYaml(readFileSync(join(k8sDir, "nats/values.yaml"), "utf8"))[0] as NatsValues;
}

/** The account every llama-edge stream lives in. */
export const ACCOUNT = "LLAMA";

export function user(values: NatsValues, name: string): NatsUser {
  const u = values.config.merge.accounts[ACCOUNT]?.users.find((x) => x.user === name);
  if (!u) throw new Error(`no user ${name} in account ${ACCOUNT}`);
  return u;
}

/** The chart writes `<< X >>` unquoted into nats.conf: a variable ($NAME) or a unit (1MB). */
export const unwrap = (v: string): string | undefined => /^<<\s*(.*?)\s*>>$/.exec(v)?.[1];

/** Every `<< $VAR >>` the values use. */
export function variablesUsed(value: unknown): string[] {
  if (typeof value === "string") {
    const inner = unwrap(value);
    return inner?.startsWith("$") ? [inner.slice(1)] : [];
  }
  if (typeof value !== "object" || value === null) return [];
  return Object.values(value).flatMap(variablesUsed);
}

/** Bytes of a NATS size (1048576, "1MB", "512KB"); NATS units are powers of 1024. */
export function parseSize(v: string | number): number {
  if (typeof v === "number") return v;
  const m = /^(\d+)\s*(B|K|KB|KIB|M|MB|MIB|G|GB|GIB)?$/i.exec(unwrap(v) ?? v);
  if (!m) throw new Error(`not a size: ${v}`);
  const unit = (m[2] ?? "B").toUpperCase()[0];
  return Number(m[1]) * ({ B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 } as Record<string, number>)[unit];
}

/**
 * The nats.conf `accounts`/`system_account`/`max_payload` the chart renders from `config.merge`, as JSON text
 * (nats.conf accepts JSON), with `<< X >>` written as X like the chart does. Variables resolve from the server's
 * environment.
 */
export function renderMergeConfig(values: NatsValues): string {
  const json = JSON.stringify(values.config.merge, null, 2);
  return json.replace(/"<<\s*(.*?)\s*>>"/g, "$1");
}

// ---------------------------------------------------------------------------------------------------------------
// Who touches which subject

export type Direction = "pub" | "sub";
export type Role = "edge" | "worker" | "pool-admin";

/**
 * How each side uses each per-pool subject of `poolNames()`. Typed on PoolNames' keys, so a subject added to the
 * protocol does not compile until someone decides who may publish and subscribe to it. `stream` and `consumer`
 * are not subjects: their use goes through the JetStream API subjects below.
 */
export const SUBJECT_USE: Record<
  Exclude<keyof PoolNames, "stream" | "consumer">,
  Partial<Record<Role, Direction[]>>
> = {
  // The gateway submits (a JetStream publish); workers receive requests through the consumer, never the subject.
  requests: { edge: ["pub"] },
  // Workers publish load reports; the gateway reads them for routing.
  load: { worker: ["pub"], edge: ["sub"] },
  // The gateway cancels; every worker of the pool listens.
  cancel: { edge: ["pub"], worker: ["sub"] },
  // The gateway offers addressed requests; each worker listens on its own subject under this pattern.
  direct: { edge: ["pub"], worker: ["sub"] },
};

const INBOX = "_INBOX.a1b2c3.4";

/**
 * Every subject each role must be allowed, for one pool, as the code that runs as that role uses them:
 * Dispatcher (shared/src/dispatcher.ts) for the edge, NatsWorker and ensurePool (gpu-worker/src/service) for the
 * workers, the pool-setup Job for pool-admin.
 */
export function requiredSubjects(pool: string): Record<Role, Record<Direction, string[]>> {
  const n = poolNames(pool);
  const out: Record<Role, Record<Direction, string[]>> = {
    edge: { pub: [], sub: [] },
    worker: { pub: [], sub: [] },
    "pool-admin": { pub: [], sub: [] },
  };
  for (const [key, use] of Object.entries(SUBJECT_USE)) {
    for (const [role, dirs] of Object.entries(use) as [Role, Direction[]][]) {
      for (const dir of dirs) out[role][dir].push(n[key as keyof typeof SUBJECT_USE]);
    }
  }
  // Replies: token events and claims travel on the requester's inbox; every JetStream API call and the pull itself
  // answer on the caller's inbox.
  out.edge.sub.push(INBOX);
  out.edge.pub.push(
    `$JS.API.CONSUMER.INFO.${n.stream}.${n.consumer}`, // Dispatcher #checkPool
    `$JS.API.STREAM.MSG.DELETE.${n.stream}`, // Dispatcher #cancel of a request still queued
  );
  out.worker.sub.push(INBOX);
  out.worker.pub.push(
    INBOX, // token events to reply_to; claims (a request to reply_to)
    "$JS.API.INFO", // jetstreamManager() checks the API
    `$JS.API.STREAM.INFO.${n.stream}`, // ensurePool
    `$JS.API.CONSUMER.INFO.${n.stream}.${n.consumer}`, // ensurePool, consumers.get
    `$JS.API.CONSUMER.MSG.NEXT.${n.stream}.${n.consumer}`, // consumer.next()
    `$JS.ACK.${n.stream}.${n.consumer}.1.7.9.1700000000000000000.0`, // ack, nak, term, working
  );
  out["pool-admin"].sub.push(INBOX);
  out["pool-admin"].pub.push(
    "$JS.API.INFO",
    `$JS.API.STREAM.INFO.${n.stream}`,
    `$JS.API.STREAM.CREATE.${n.stream}`,
    `$JS.API.CONSUMER.INFO.${n.stream}.${n.consumer}`,
    `$JS.API.CONSUMER.CREATE.${n.stream}.${n.consumer}`, // nats-server >= 2.9
    `$JS.API.CONSUMER.CREATE.${n.stream}.${n.consumer}.${n.requests}`, // ... with a filter subject
    `$JS.API.CONSUMER.DURABLE.CREATE.${n.stream}.${n.consumer}`, // older servers and clients
  );
  return out;
}

/** Subjects a role must never reach, whatever the pool: the separation the accounts are there for. */
export function forbiddenSubjects(pool: string): Record<Role, Record<Direction, string[]>> {
  const n = poolNames(pool);
  const admin = [
    `$JS.API.STREAM.CREATE.${n.stream}`,
    `$JS.API.STREAM.UPDATE.${n.stream}`,
    `$JS.API.STREAM.DELETE.${n.stream}`,
    `$JS.API.STREAM.PURGE.${n.stream}`,
    `$JS.API.CONSUMER.DELETE.${n.stream}.${n.consumer}`,
    `$JS.API.CONSUMER.CREATE.${n.stream}.${n.consumer}`,
  ];
  return {
    // The edge must not take requests off the queue as a worker would, nor speak for a worker.
    edge: {
      pub: [
        ...admin,
        `$JS.API.CONSUMER.MSG.NEXT.${n.stream}.${n.consumer}`,
        `$JS.ACK.${n.stream}.${n.consumer}.1.1.1.1.0`,
        n.load,
      ],
      sub: [n.requests, n.cancel],
    },
    // A worker must not submit or cancel requests, nor edit the queue.
    worker: {
      pub: [...admin, n.requests, n.cancel, `$JS.API.STREAM.MSG.DELETE.${n.stream}`],
      sub: [n.requests, n.load],
    },
    "pool-admin": {
      pub: [
        n.requests,
        n.cancel,
        n.load,
        `$JS.API.STREAM.DELETE.${n.stream}`,
        `$JS.API.CONSUMER.MSG.NEXT.${n.stream}.${n.consumer}`,
      ],
      sub: [n.requests, n.cancel, n.load],
    },
  };
}

/** NATS subject matching: `*` is one token, `>` one or more trailing tokens. */
export function subjectMatches(pattern: string, subject: string): boolean {
  const p = pattern.split(".");
  const s = subject.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return s.length > i;
    if (i >= s.length || (p[i] !== "*" && p[i] !== s[i])) return false;
  }
  return p.length === s.length;
}

export function allowed(perms: Permissions | undefined, dir: Direction, subject: string): boolean {
  const p = dir === "pub" ? perms?.publish : perms?.subscribe;
  if (!p) return true; // no permissions block: everything
  if ((p.deny ?? []).some((d) => subjectMatches(d, subject))) return false;
  return p.allow === undefined || p.allow.some((a) => subjectMatches(a, subject));
}
