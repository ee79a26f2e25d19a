import { MAX_REQUEST_BYTES, poolNames } from "@llama-edge/shared";
import { describe, expect, it } from "vitest";
import { validateManifest } from "./k8s.ts";
import {
  ACCOUNT,
  allowed,
  type Direction,
  forbiddenSubjects,
  natsValues,
  parseSize,
  type Role,
  requiredSubjects,
  SUBJECT_USE,
  subjectMatches,
  user,
  variablesUsed,
} from "./nats-values.ts";

const values = natsValues();
const ROLES: Role[] = ["edge", "worker", "pool-admin"];
// Two pools, one with a dash: wildcards must cover any valid pool name, and nothing pool-specific may leak in.
const POOLS = ["default", "long-context"];

describe("NATS Helm values", () => {
  it("run a 3-node cluster with JetStream on file storage (PVCs)", () => {
    expect(values.config.cluster.enabled).toBe(true);
    expect(values.config.cluster.replicas).toBe(3);
    const js = values.config.jetstream;
    expect(js.enabled).toBe(true);
    expect(js.fileStore.enabled ?? true).toBe(true);
    expect(js.fileStore.pvc.enabled ?? true).toBe(true);
    expect(js.fileStore.pvc.size).toMatch(/^\d+[GT]i$/);
  });

  it("open a TLS WebSocket listener for the edge, exposed by a LoadBalancer on 443", () => {
    const ws = values.config.websocket;
    expect(ws.enabled).toBe(true);
    expect(ws.tls.enabled).toBe(true);
    expect(ws.tls.secretName).toBeTruthy();
    const lb = (values.extraResources ?? []).find((r) => r.kind === "Service" && r.spec?.type === "LoadBalancer");
    expect(lb, "LoadBalancer Service for the WebSocket port").toBeDefined();
    if (!lb) return;
    expect(validateManifest(lb)).toEqual([]);
    expect(lb.spec.ports).toEqual([expect.objectContaining({ port: 443, targetPort: "websocket" })]);
    // The chart's server pods, not nats-box (v1 chart selector labels: name, instance, component=nats).
    expect(lb.spec.selector).toEqual({
      "app.kubernetes.io/name": "nats",
      "app.kubernetes.io/instance": "nats",
      "app.kubernetes.io/component": "nats",
    });
  });

  it("serve the monitoring endpoint KEDA reads", () => {
    expect(values.config.monitor.enabled).toBe(true);
    expect(values.config.monitor.port).toBe(8222);
  });

  it("let a request of MAX_REQUEST_BYTES through (the worker answers too_large above it, not the server)", () => {
    expect(parseSize(values.config.merge.max_payload ?? 1048576)).toBeGreaterThan(MAX_REQUEST_BYTES);
  });

  it("keep the streams in one JetStream-enabled account, with a system account", () => {
    const accounts = values.config.merge.accounts;
    expect(accounts[ACCOUNT].jetstream).toBe("enabled");
    expect(values.config.merge.system_account).toBeDefined();
    expect(Object.keys(accounts)).toContain(values.config.merge.system_account);
    expect(accounts[ACCOUNT].users.map((u) => u.user).sort()).toEqual(["edge", "pool-admin", "worker"]);
  });

  it("take every password from the environment, and every variable from a Secret", () => {
    for (const account of Object.values(values.config.merge.accounts)) {
      for (const u of account.users) expect(u.password, u.user).toMatch(/^<< \$[A-Z0-9_]+ >>$/);
    }
    const env = values.container.env;
    for (const v of variablesUsed(values.config)) {
      expect(env[v]?.valueFrom?.secretKeyRef?.name, `${v} from a Secret`).toBe("nats-users");
    }
  });
});

describe("NATS permissions", () => {
  it("match subjects the way nats-server does", () => {
    expect(subjectMatches("llama.pool.*.requests", "llama.pool.long-context.requests")).toBe(true);
    expect(subjectMatches("llama.pool.*.requests", "llama.pool.a.b.requests")).toBe(false);
    expect(subjectMatches("_INBOX.>", "_INBOX")).toBe(false);
    expect(subjectMatches("_INBOX.>", "_INBOX.x.y")).toBe(true);
    expect(subjectMatches("$JS.API.STREAM.INFO.*", "$JS.API.STREAM.INFO.llama-pool-default")).toBe(true);
  });

  it("decide who uses every subject of poolNames() (a new subject needs a decision here first)", () => {
    const subjects = Object.keys(poolNames("x")).filter((k) => k !== "stream" && k !== "consumer");
    expect(subjects.sort()).toEqual(Object.keys(SUBJECT_USE).sort());
  });

  it.each(ROLES)("%s: every subject its code uses is allowed, for any pool", (role) => {
    const perms = user(values, role).permissions;
    for (const pool of POOLS) {
      for (const dir of ["pub", "sub"] as Direction[]) {
        for (const s of requiredSubjects(pool)[role][dir])
          expect(allowed(perms, dir, s), `${role} ${dir} ${s}`).toBe(true);
      }
    }
  });

  it.each(ROLES)("%s: nothing beyond its part of the protocol", (role) => {
    const perms = user(values, role).permissions;
    expect(perms?.publish?.allow, `${role} must have a publish allow-list`).toBeDefined();
    expect(perms?.subscribe?.allow, `${role} must have a subscribe allow-list`).toBeDefined();
    for (const pool of POOLS) {
      for (const dir of ["pub", "sub"] as Direction[]) {
        for (const s of forbiddenSubjects(pool)[role][dir])
          expect(allowed(perms, dir, s), `${role} ${dir} ${s}`).toBe(false);
      }
    }
    // Exactly: every allow entry is needed by some subject the code uses (no leftover grants).
    for (const dir of ["pub", "sub"] as Direction[]) {
      const allow = (dir === "pub" ? perms?.publish?.allow : perms?.subscribe?.allow) ?? [];
      const used = POOLS.flatMap((p) => requiredSubjects(p)[role][dir]);
      for (const a of allow)
        expect(
          used.some((s) => subjectMatches(a, s)),
          `${role} ${dir} ${a} is not used`,
        ).toBe(true);
    }
  });

  it("only the edge answers requests it received (claims on redelivered requests)", () => {
    expect(user(values, "edge").permissions?.allow_responses).toBeTruthy();
    expect(user(values, "worker").permissions?.allow_responses).toBeFalsy();
    expect(user(values, "pool-admin").permissions?.allow_responses).toBeFalsy();
  });
});
