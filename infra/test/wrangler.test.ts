/**
 * The production wrangler configuration (infra/cloudflare/wrangler.jsonc): consistent with the gateway's own
 * configuration and code, with the worker pools it routes to, and deployable: `wrangler deploy --dry-run` bundles
 * the gateway offline and checks that every Durable Object class it binds is exported.
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { parseGatewayConfig } from "../../edge/src/config.ts";
import { hasKubectl, infraDir, k8sDir, kustomize, repoRoot } from "./k8s.ts";
import { natsValues } from "./nats-values.ts";
import { poolNameOf, poolsOf } from "./pool.ts";

const configPath = join(infraDir, "cloudflare/wrangler.jsonc");
const edgeConfigPath = join(repoRoot, "edge/wrangler.jsonc");
const edgeEntry = join(repoRoot, "edge/src/index.ts");

/** JSON with comments and trailing commas, as wrangler reads .jsonc. */
export function parseJsonc(text: string): unknown {
  let out = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
      out += text.slice(i, j + 1);
      i = j;
    } else if (c === "/" && text[i + 1] === "/") {
      while (i < text.length && text[i] !== "\n") i++;
      out += "\n";
    } else if (c === "/" && text[i + 1] === "*") {
      i = text.indexOf("*/", i + 2) + 1;
    } else out += c;
  }
  return JSON.parse(out.replace(/,(\s*[}\]])/g, "$1"));
}

interface WranglerConfig {
  name: string;
  main: string;
  compatibility_date: string;
  compatibility_flags?: string[];
  workers_dev?: boolean;
  routes?: { pattern: string; custom_domain?: boolean; zone_name?: string }[];
  vars?: Record<string, unknown>;
  durable_objects?: { bindings: { name: string; class_name: string }[] };
  migrations?: unknown[];
  build?: { command: string; watch_dir?: string };
  assets?: { directory: string; not_found_handling?: string; run_worker_first?: boolean | string[] };
}

const config = parseJsonc(readFileSync(configPath, "utf8")) as WranglerConfig;
const edgeConfig = parseJsonc(readFileSync(edgeConfigPath, "utf8")) as WranglerConfig;
const configText = readFileSync(configPath, "utf8");

/** The secrets the file's header tells the operator to set. */
const secrets = [...configText.matchAll(/wrangler secret put (\w+)/g)].map((m) => m[1]);

describe("production wrangler config", () => {
  it("deploys the gateway's entry point with the gateway's runtime settings", () => {
    expect(resolve(dirname(configPath), config.main)).toBe(resolve(dirname(edgeConfigPath), edgeConfig.main));
    expect(config.compatibility_date).toBe(edgeConfig.compatibility_date);
    expect(config.compatibility_flags ?? []).toEqual(edgeConfig.compatibility_flags ?? []);
  });

  it("binds the same Durable Objects with the same migration history as edge/", () => {
    // A production Worker's migrations are append-only: a divergent history would fail to deploy or lose state.
    expect(config.durable_objects).toEqual(edgeConfig.durable_objects);
    expect(config.migrations).toEqual(edgeConfig.migrations);
  });

  it("serves the web console as edge/ does, built before every deploy", () => {
    expect(resolve(dirname(configPath), config.assets!.directory)).toBe(
      resolve(dirname(edgeConfigPath), edgeConfig.assets!.directory),
    );
    expect({ ...config.assets, directory: "" }).toEqual({ ...edgeConfig.assets, directory: "" });
    expect(config.build?.command).toMatch(/console\/build\.mjs/);
  });

  it("serves on a custom domain only", () => {
    expect(config.workers_dev).toBe(false);
    expect(config.routes?.length).toBeGreaterThan(0);
    for (const r of config.routes ?? []) expect(r.custom_domain || r.zone_name, r.pattern).toBeTruthy();
  });

  it("lists every secret with `wrangler secret put`, and keeps them out of vars", () => {
    expect(secrets).toEqual(expect.arrayContaining(["ADMIN_SECRET", "NATS_URL", "NATS_USER", "NATS_PASSWORD"]));
    for (const s of secrets) expect(Object.keys(config.vars ?? {}), `${s} is a secret, not a var`).not.toContain(s);
    // The gateway logs into NATS as the `edge` user of the NATS values.
    expect(configText).toMatch(/NATS_USER\s.*#\s*edge\b/);
    expect(natsValues().config.merge.accounts.LLAMA.users.map((u) => u.user)).toContain("edge");
  });

  it.skipIf(!existsSync(edgeEntry))("names only secrets and vars the gateway's code reads", () => {
    const src = readdirSync(join(repoRoot, "edge/src"), { recursive: true, encoding: "utf8" })
      .filter((f) => f.endsWith(".ts"))
      .map((f) => readFileSync(join(repoRoot, "edge/src", f), "utf8"))
      .join("\n");
    for (const name of [...secrets, ...Object.keys(config.vars ?? {})])
      expect(src, `edge/src reads ${name}`).toContain(name);
  });

  it("routes to exactly the pools of the production overlay, with the models their workers serve", () => {
    const gateway = parseGatewayConfig(config.vars?.GATEWAY_CONFIG);
    const poolDirs = readdirSync(join(k8sDir, "overlays/production/pools")).sort();
    expect(Object.keys(gateway.pools).sort()).toEqual(poolDirs);
    if (!hasKubectl()) return;
    for (const pool of poolsOf(kustomize(join(k8sDir, "overlays/production")))) {
      const name = poolNameOf(pool);
      expect(gateway.pools[name]?.models, `pool ${name}`).toContain(pool.env.LLAMA_SERVED_MODEL_NAME);
    }
  });

  it.skipIf(!existsSync(edgeEntry))(
    "`wrangler deploy --dry-run` bundles the gateway offline",
    () => {
      const wrangler = join(
        dirname(createRequire(join(infraDir, "package.json")).resolve("wrangler/package.json")),
        "bin/wrangler.js",
      );
      const outdir = mkdtempSync(join(tmpdir(), "llama-edge-wrangler-"));
      try {
        const r = spawnSync(
          process.execPath,
          [wrangler, "deploy", "--dry-run", "--outdir", outdir, "--config", configPath],
          {
            cwd: dirname(configPath),
            encoding: "utf8",
            timeout: 120_000,
            env: {
              ...process.env,
              WRANGLER_SEND_METRICS: "false",
              CLOUDFLARE_CF_FETCH_ENABLED: "false",
              // No account, no network: a dry run needs neither.
              CLOUDFLARE_API_TOKEN: "",
              CLOUDFLARE_ACCOUNT_ID: "",
              NO_COLOR: "1",
            },
          },
        );
        expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
        expect(r.stdout).toContain("--dry-run: exiting now.");
        for (const b of config.durable_objects?.bindings ?? [])
          expect(r.stdout).toContain(`env.${b.name} (${b.class_name})`);
        expect(readdirSync(outdir)).toContain("index.js");
      } finally {
        rmSync(outdir, { recursive: true, force: true });
      }
    },
    150_000,
  );
});
