/**
 * No Docker engine runs here, so the worker images are checked by reading their Dockerfiles: what they copy exists
 * and gets past the ignore file, the entry point is the worker's command line, the CUDA image installs the CUDA
 * execution provider the way onnxruntime-node's install script actually works, and the WebGPU image has what Dawn
 * needs to find an NVIDIA GPU through Vulkan.
 */
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { describe, expect, it } from "vitest";
import { infraDir, repoRoot } from "./k8s.ts";

const dockerDir = join(infraDir, "docker");
const IMAGES = ["worker.Dockerfile", "worker-cuda.Dockerfile", "worker-webgpu.Dockerfile"];

interface Instruction {
  op: string;
  args: string;
}

const last = (ins: Instruction[], op: string): Instruction | undefined => ins.filter((i) => i.op === op).at(-1);

/** Instructions of a Dockerfile, with line continuations joined and comments dropped. */
function instructions(file: string): Instruction[] {
  const text = readFileSync(join(dockerDir, file), "utf8")
    .split("\n")
    .filter((l) => !/^\s*#/.test(l))
    .join("\n")
    .replace(/\\\n/g, " ");
  return text
    .split("\n")
    .map((l) => l.trim())
    .filter(Boolean)
    .map((l) => {
      const [op, ...rest] = l.split(/\s+/);
      return { op: op.toUpperCase(), args: rest.join(" ") };
    });
}

/** The paths a .dockerignore allow-list lets into the build context (gitignore-like, last match wins). */
function ignored(patterns: string[], path: string): boolean {
  let out = false;
  for (const raw of patterns) {
    const negate = raw.startsWith("!");
    const p = negate ? raw.slice(1) : raw;
    const re = new RegExp(
      `^${p
        .replace(/[.+^${}()|[\]\\]/g, "\\$&")
        .replace(/\*\*\//g, "%%ANYDIR%%")
        .replace(/\*/g, "[^/]*")
        .replace(/%%ANYDIR%%/g, "(?:.*/)?")}(?:/.*)?$`,
    );
    if (re.test(path)) out = !negate;
  }
  return out;
}

/** Files under a repository folder (node_modules excluded), relative to the repository root. */
function filesUnder(dir: string): string[] {
  return readdirSync(join(repoRoot, dir), { withFileTypes: true }).flatMap((e) => {
    if (e.name === "node_modules") return [];
    const p = `${dir}/${e.name}`;
    return e.isDirectory() ? filesUnder(p) : [p];
  });
}

const ignorePatterns = (file: string) =>
  readFileSync(join(dockerDir, `${file}.dockerignore`), "utf8")
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith("#"));

describe.each(IMAGES)("%s", (file) => {
  const ins = instructions(file);
  const patterns = ignorePatterns(file);

  it("builds FROM Node 20 and runs `llama-worker serve` as PID 1, as uid 1000", () => {
    const froms = ins.filter((i) => i.op === "FROM").map((i) => i.args);
    const args = Object.fromEntries(
      ins.filter((i) => i.op === "ARG" && i.args.includes("=")).map((i) => i.args.split("=") as [string, string]),
    );
    expect(args.NODE_IMAGE).toMatch(/^node:20[-.]/);
    expect(froms.some((f) => f.startsWith(`\${NODE_IMAGE}`))).toBe(true);
    const entry = JSON.parse(last(ins, "ENTRYPOINT")?.args ?? "null") as string[];
    expect(entry[0]).toBe("node");
    expect(existsSync(join(repoRoot, entry[1]))).toBe(true);
    expect(JSON.parse(last(ins, "CMD")?.args ?? "null")).toEqual(["serve"]);
    expect(last(ins, "USER")?.args).toMatch(/^(node|1000(:1000)?)$/);
    expect(
      ins
        .filter((i) => i.op === "ENV")
        .map((i) => i.args)
        .join(" "),
    ).toContain("LLAMA_EDGE_CACHE_DIR=/cache");
  });

  it("copies only files that exist and that its ignore file lets into the context", () => {
    const sources = ins
      .filter((i) => i.op === "COPY" && !i.args.startsWith("--from"))
      .flatMap((i) => i.args.split(/\s+/).slice(0, -1));
    expect(sources.length).toBeGreaterThan(0);
    for (const src of sources) {
      const path = src.replace(/\/$/, "");
      expect(existsSync(join(repoRoot, path)), `${src} exists`).toBe(true);
      const files = statSync(join(repoRoot, path)).isDirectory() ? filesUnder(path) : [path];
      expect(
        files.filter((f) => !ignored(patterns, f)).length,
        `${src}: something gets into the context`,
      ).toBeGreaterThan(0);
    }
    // What the worker runs gets in.
    for (const path of [
      "shared/src/protocol.ts",
      "gpu-worker/src/cli.ts",
      "gpu-worker/bin/llama-worker.js",
      "package-lock.json",
    ]) {
      expect(ignored(patterns, path), `${path} is in the context`).toBe(false);
    }
    // What must stay out: tests, dependencies built for this machine, the other packages' sources.
    for (const path of [
      "gpu-worker/src/engine/sampler.test.ts",
      "node_modules/x",
      "gpu-worker/node_modules/x",
      "edge/src/index.ts",
      ".git/config",
    ]) {
      expect(ignored(patterns, path), `${path} is ignored`).toBe(true);
    }
    // Every workspace's package.json goes in: npm ci checks the whole lockfile.
    const workspaces = JSON.parse(readFileSync(join(repoRoot, "package.json"), "utf8")).workspaces as string[];
    for (const ws of workspaces) expect(sources, `${ws}/package.json copied`).toContain(`${ws}/package.json`);
  });

  it("installs gpu-worker's production dependencies from the lockfile, without downloading during npm ci", () => {
    const runs = ins.filter((i) => i.op === "RUN").map((i) => i.args);
    const ci = runs.find((r) => r.includes("npm ci"));
    expect(ci).toContain("ONNXRUNTIME_NODE_INSTALL=skip");
    expect(ci).toContain("--omit=dev");
    expect(ci).toContain("--workspace @llama-edge/gpu-worker");
  });
});

describe("the CUDA image", () => {
  const ins = instructions("worker-cuda.Dockerfile");
  const runs = ins.filter((i) => i.op === "RUN").map((i) => i.args);
  const ortDir = dirname(
    createRequire(join(repoRoot, "gpu-worker/package.json")).resolve("onnxruntime-node/package.json"),
  );

  it("runs on a CUDA 12 runtime with cuDNN 9", () => {
    const arg = ins.find((i) => i.op === "ARG" && i.args.startsWith("CUDA_IMAGE="))?.args.split("=")[1];
    // nvidia/cuda tags: 12.x with a bare `cudnn` flavour carry cuDNN 9.
    expect(arg).toMatch(/^nvidia\/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+$/);
    expect(last(ins, "FROM")?.args).toBe(`\${CUDA_IMAGE}`);
  });

  it("forces onnxruntime-node's CUDA download with a value its flag parser accepts, then checks the files", () => {
    const install = runs.find((r) => r.includes("script/install.js"));
    expect(install).toBeDefined();
    const value = /ONNXRUNTIME_NODE_INSTALL=(\S+)/.exec(install ?? "")?.[1];
    // Ask the installed onnxruntime-node how it reads that value: `true` forces the platform's manifests.
    const parse = (v: string) =>
      spawnSync(
        process.execPath,
        ["-e", `console.log(JSON.stringify(require("./script/install-utils.js").parseInstallFlag()))`],
        {
          cwd: ortDir,
          env: { ...process.env, ONNXRUNTIME_NODE_INSTALL: v, ONNXRUNTIME_NODE_INSTALL_CUDA: "" },
          encoding: "utf8",
        },
      ).stdout.trim();
    expect(parse(value ?? "")).toBe("true");
    expect(parse("skip")).toBe("false");
    // The files the linux/x64 CUDA manifest installs are the ones the build checks for.
    const metadata = createRequire(join(ortDir, "package.json"))("./script/install-metadata.js") as {
      requirements: Record<string, string[]>;
      manifests: Record<string, Record<string, unknown>>;
    };
    expect(metadata.requirements["linux/x64"]).toEqual(["cuda12"]);
    const files = Object.keys(metadata.manifests["linux/x64:cuda12"]).map((f) => f.replace(/^\.\//, ""));
    const checked = [
      ...(install ?? "").matchAll(/test -f node_modules\/onnxruntime-node\/bin\/napi-v6\/linux\/x64\/(\S+)/g),
    ].map((m) => m[1]);
    expect(checked).toContain("libonnxruntime_providers_cuda.so");
    for (const f of checked) expect(files).toContain(f);
  });

  it("defaults to the CUDA execution provider", () => {
    expect(
      ins
        .filter((i) => i.op === "ENV")
        .map((i) => i.args)
        .join(" "),
    ).toContain("LLAMA_DEVICE=cuda");
  });
});

describe("the WebGPU image", () => {
  const ins = instructions("worker-webgpu.Dockerfile");
  const env = ins
    .filter((i) => i.op === "ENV")
    .map((i) => i.args)
    .join(" ");

  it("carries the Vulkan loader and no CUDA", () => {
    const runs = ins.filter((i) => i.op === "RUN").map((i) => i.args);
    expect(runs.some((r) => /apt-get install .*\blibvulkan1\b/.test(r))).toBe(true);
    expect(runs.join(" ")).not.toContain("script/install.js");
    expect(last(ins, "FROM")?.args).toBe(`\${NODE_IMAGE}`);
  });

  it("asks the NVIDIA container toolkit for the graphics capability (the driver's Vulkan ICD) and runs webgpu", () => {
    const caps = /NVIDIA_DRIVER_CAPABILITIES=(\S+)/.exec(env)?.[1].split(",") ?? [];
    expect(caps).toContain("graphics");
    expect(caps).toContain("compute");
    expect(env).toContain("LLAMA_DEVICE=webgpu");
  });
});
