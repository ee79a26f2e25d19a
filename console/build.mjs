#!/usr/bin/env node
// Builds the console into console/dist: index.html, app.js and app.css, everything bundled (no CDN: the gateway
// serves these files as Workers static assets, offline deployments included). wrangler runs this before
// `wrangler dev` and `wrangler deploy` (the `build` section of edge/wrangler.jsonc and
// infra/cloudflare/wrangler.jsonc); `--watch` rebuilds on every change while you work on the console.
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
export const distDir = join(here, "dist");

/** esbuild options of the console bundle. */
const options = {
  entryPoints: { app: join(here, "src", "main.tsx") },
  outdir: distDir,
  bundle: true,
  format: "esm",
  target: "es2022",
  jsx: "automatic",
  jsxImportSource: "preact",
  minify: true,
  sourcemap: true,
  legalComments: "linked",
  logLevel: "warning",
};

export async function buildConsole() {
  mkdirSync(distDir, { recursive: true });
  copyFileSync(join(here, "src", "index.html"), join(distDir, "index.html"));
  await esbuild.build(options);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  if (process.argv.includes("--watch")) {
    mkdirSync(distDir, { recursive: true });
    copyFileSync(join(here, "src", "index.html"), join(distDir, "index.html"));
    const ctx = await esbuild.context({ ...options, logLevel: "info" });
    await ctx.watch();
  } else {
    await buildConsole();
  }
}
