import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type FakeHub, type FakeRepo, startFakeHub } from "../../test/fake-hub.ts";
import { loadLlamaConfig } from "./config.ts";
import { downloadProgressReporter } from "./download-progress.ts";
import { type DownloadOptions, downloadModel, HubError, hubSettingsFromEnv, parseHubRef } from "./hub.ts";
import { writeRandomLlama } from "./random-model.ts";
import { openCheckpointTensors } from "./safetensors.ts";

const SHAPE = { hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, vocab_size: 256 };

/** A random checkpoint as a Hub repo, plus files serving must not fetch. */
function repoFrom(dir: string, extra: Record<string, string> = {}): FakeRepo {
  const files: Record<string, Uint8Array> = {};
  for (const f of readdirSync(dir)) files[f] = readFileSync(join(dir, f));
  // The random model has no tokenizer at this vocabulary size: any valid files will do for downloading.
  files["tokenizer.json"] = Buffer.from(JSON.stringify({ model: { type: "BPE", vocab: {}, merges: [] } }));
  files["tokenizer_config.json"] = Buffer.from("{}");
  for (const [k, v] of Object.entries(extra)) files[k] = Buffer.from(v);
  return { files };
}

function binOnly(): FakeRepo {
  const { files } = repoFrom(join(work, "single"), { "pytorch_model.bin": "weights" });
  delete files["model.safetensors"];
  return { files };
}

let work: string;
let hub: FakeHub;
let single: FakeRepo;
let cache: string;

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), "llama-edge-hub-"));
  writeRandomLlama(join(work, "single"), { config: SHAPE, seed: 1, tokenizer: "none" });
  writeRandomLlama(join(work, "sharded"), { config: SHAPE, seed: 2, tokenizer: "none", shards: 3 });
  single = repoFrom(join(work, "single"), {
    "pytorch_model.bin": "not needed",
    "original/consolidated.00.pth": "not needed",
    ".gitattributes": "*.safetensors filter=lfs",
  });
  hub = await startFakeHub({
    "org/tiny": single,
    "org/sharded": repoFrom(join(work, "sharded")),
    "org/private": { ...repoFrom(join(work, "single")), token: "hf_secret" },
    "org/gated": { ...repoFrom(join(work, "single")), token: "hf_granted", gated: true },
    "org/no-tokenizer": {
      files: { "config.json": single.files["config.json"], "model.safetensors": single.files["model.safetensors"] },
    },
    "org/bin-only": binOnly(),
  });
});

afterAll(async () => {
  await hub?.close();
  rmSync(work, { recursive: true, force: true });
});

beforeEach(() => {
  cache = mkdtempSync(join(work, "cache-"));
  hub.requests.length = 0;
});

const opts = (o: DownloadOptions = {}): DownloadOptions => ({
  endpoint: hub.url,
  cacheDir: cache,
  token: undefined,
  offline: false,
  retryDelayMs: 10,
  ...o,
});

async function expectHubError(p: Promise<unknown>, ...parts: string[]): Promise<HubError> {
  const e = await p.then(
    () => {
      throw new Error("expected a HubError");
    },
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(HubError);
  const message = (e as Error).message;
  expect(message.includes("\n"), message).toBe(false);
  for (const part of parts) expect(message).toContain(part);
  return e as HubError;
}

const downloads = () =>
  hub.requests.filter((r) => r.method === "GET" && !r.path.startsWith("/api/") && r.range !== "bytes=0-0");

describe("parseHubRef", () => {
  it("reads org/name and org/name@revision, and nothing that looks like a path", () => {
    expect(parseHubRef("TinyLlama/TinyLlama-1.1B-Chat-v1.0")).toEqual({
      repo: "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
      revision: "main",
    });
    expect(parseHubRef("meta-llama/Llama-3.2-1B@v1.0")).toEqual({ repo: "meta-llama/Llama-3.2-1B", revision: "v1.0" });
    for (const s of ["/models/x", "./a/b", "a/b/c", "a", "../a/b", "a/b@", "a/b@x y"])
      expect(parseHubRef(s)).toBeNull();
  });

  it("takes the endpoint, token and cache from huggingface_hub's variables", () => {
    const s = hubSettingsFromEnv({ HF_HOME: "/data/hf", HF_ENDPOINT: "https://mirror.example/", HF_TOKEN: "hf_x" });
    expect(s).toEqual({ endpoint: "https://mirror.example", token: "hf_x", cacheDir: "/data/hf/hub", offline: false });
    expect(
      hubSettingsFromEnv({ HF_HUB_CACHE: "/c", HF_HUB_OFFLINE: "1", HF_TOKEN_PATH: "/nonexistent" }),
    ).toMatchObject({
      cacheDir: "/c",
      offline: true,
      token: undefined,
    });
  });
});

describe("downloadModel", () => {
  it("fetches only what serving reads, into huggingface_hub's cache layout", async () => {
    const m = await downloadModel({ repo: "org/tiny", revision: "main" }, opts());
    const storage = join(cache, "models--org--tiny");
    expect(m.dir).toBe(join(storage, "snapshots", m.commit));
    expect(readFileSync(join(storage, "refs", "main"), "utf8")).toBe(m.commit);
    expect(readdirSync(m.dir).sort()).toEqual([
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
    ]);
    // Relative symlinks into blobs/, named by sha256 for LFS files (as huggingface_hub names them).
    const sha = (await import("node:crypto"))
      .createHash("sha256")
      .update(single.files["model.safetensors"])
      .digest("hex");
    expect(readlinkSync(join(m.dir, "model.safetensors"))).toBe(`../../blobs/${sha}`);
    expect(readFileSync(join(m.dir, "model.safetensors"))).toEqual(Buffer.from(single.files["model.safetensors"]));
    expect(loadLlamaConfig(m.dir).hiddenSize).toBe(32);
    expect(openCheckpointTensors(m.dir).size).toBeGreaterThan(0);
    const fetched = downloads().map((r) => r.path);
    for (const skipped of ["README.md", "pytorch_model.bin", ".gitattributes", "consolidated"])
      expect(fetched.join(" ")).not.toContain(skipped);
    expect(m.downloadedBytes).toBe(readdirSync(m.dir).reduce((n, f) => n + readFileSync(join(m.dir, f)).byteLength, 0));
    expect(existsSync(join(storage, "blobs", `${sha}.incomplete`))).toBe(false);
  });

  it("reuses the cache: nothing is transferred again, and a commit or HF_HUB_OFFLINE needs no network", async () => {
    const first = await downloadModel({ repo: "org/tiny", revision: "main" }, opts());
    hub.requests.length = 0;
    const again = await downloadModel({ repo: "org/tiny", revision: "main" }, opts());
    expect(again).toMatchObject({ dir: first.dir, downloadedBytes: 0 });
    expect(downloads()).toEqual([]);
    hub.requests.length = 0;
    expect((await downloadModel({ repo: "org/tiny", revision: first.commit }, opts())).dir).toBe(first.dir);
    expect((await downloadModel({ repo: "org/tiny", revision: "main" }, opts({ offline: true }))).dir).toBe(first.dir);
    expect(hub.requests).toEqual([]);
  });

  it("serves the cached snapshot when the Hub is unreachable, and says so", async () => {
    const first = await downloadModel({ repo: "org/tiny", revision: "main" }, opts());
    hub.down(0);
    try {
      const warnings: string[] = [];
      const m = await downloadModel(
        { repo: "org/tiny", revision: "main" },
        opts({ attempts: 2, onWarning: (w) => warnings.push(w) }),
      );
      expect(m.dir).toBe(first.dir);
      expect(warnings.at(-1)).toContain("using the cached snapshot");
      // Nothing cached for this one: the failure, after the retries.
      await expectHubError(
        downloadModel({ repo: "org/sharded", revision: "main" }, opts({ attempts: 2 })),
        "org/sharded",
        `request to ${hub.url} failed after 2 attempts`,
      );
    } finally {
      hub.down(null);
    }
  });

  it("fetches the index and exactly the shards it names", async () => {
    const m = await downloadModel({ repo: "org/sharded", revision: "main" }, opts());
    const files = readdirSync(m.dir).sort();
    expect(files.filter((f) => f.endsWith(".safetensors"))).toHaveLength(3);
    expect(files).toContain("model.safetensors.index.json");
    expect(openCheckpointTensors(m.dir).size).toBeGreaterThan(0);
  });

  it("resumes from the bytes a killed download left, and recovers from a cut transfer", async () => {
    const bytes = Buffer.from(single.files["model.safetensors"]);
    const { createHash } = await import("node:crypto");
    const sha = createHash("sha256").update(bytes).digest("hex");
    // What a worker killed mid-download leaves behind: the first third of the blob.
    const blobs = join(cache, "models--org--tiny", "blobs");
    mkdirSync(blobs, { recursive: true });
    const third = Math.floor(bytes.byteLength / 3);
    writeFileSync(join(blobs, `${sha}.incomplete`), bytes.subarray(0, third));
    // This run's transfer is cut once more (the connection drops): it is retried from what arrived.
    hub.fault("org/tiny", "model.safetensors", { cutAfterBytes: 1000 });
    const m = await downloadModel({ repo: "org/tiny", revision: "main" }, opts());
    const ranges = downloads()
      .filter((r) => r.path.startsWith("/cdn/"))
      .map((r) => Number(/^bytes=(\d+)-$/.exec(r.range ?? "")?.[1]));
    expect(ranges[0], "the first request asks only for the rest").toBe(third);
    expect(ranges).toHaveLength(2);
    expect(ranges[1]).toBeGreaterThanOrEqual(third);
    expect(ranges[1]).toBeLessThanOrEqual(third + 1000);
    expect(readFileSync(join(m.dir, "model.safetensors"))).toEqual(bytes);
    expect(readdirSync(blobs).some((f) => f.endsWith(".incomplete"))).toBe(false);
  });

  it("detects corrupted bytes by sha256, starts the file over, and reports a persistent corruption", async () => {
    hub.fault("org/tiny", "model.safetensors", { corrupt: true });
    const warnings: string[] = [];
    const m = await downloadModel({ repo: "org/tiny", revision: "main" }, opts({ onWarning: (w) => warnings.push(w) }));
    expect(warnings.join("\n")).toContain("sha256 mismatch");
    expect(readFileSync(join(m.dir, "model.safetensors"))).toEqual(Buffer.from(single.files["model.safetensors"]));

    rmSync(cache, { recursive: true, force: true });
    hub.fault("org/tiny", "model.safetensors", { corrupt: true, times: 3 });
    await expectHubError(
      downloadModel({ repo: "org/tiny", revision: "main" }, opts({ attempts: 3 })),
      "org/tiny/model.safetensors",
      "sha256 mismatch",
    );
    const blobs = join(cache, "models--org--tiny", "blobs");
    expect(readdirSync(blobs).filter((f) => !f.endsWith(".incomplete")).length, "no corrupt blob is kept").toBeLessThan(
      Object.keys(single.files).length,
    );
    expect(existsSync(join(cache, "models--org--tiny", "snapshots"))).toBe(true);
    const snapshot = readdirSync(join(cache, "models--org--tiny", "snapshots"))[0];
    expect(existsSync(join(cache, "models--org--tiny", "snapshots", snapshot, "model.safetensors"))).toBe(false);
  });

  it("explains a 401 in terms of HF_TOKEN, a gated repo, and what is missing, one line naming the repo", async () => {
    await expectHubError(
      downloadModel({ repo: "org/private", revision: "main" }, opts()),
      "org/private:",
      "HF_TOKEN is not set",
      "401",
    );
    await expectHubError(
      downloadModel({ repo: "org/private", revision: "main" }, opts({ token: "hf_wrong" })),
      "HF_TOKEN has no access",
    );
    const ok = await downloadModel({ repo: "org/private", revision: "main" }, opts({ token: "hf_secret" }));
    expect(existsSync(join(ok.dir, "model.safetensors"))).toBe(true);
    expect(hub.requests.filter((r) => r.path.startsWith("/api/")).at(-1)?.authorization).toBe("Bearer hf_secret");

    await expectHubError(
      downloadModel({ repo: "org/gated", revision: "main" }, opts({ token: "hf_other" })),
      "org/gated:",
      "gated repository",
      `${hub.url}/org/gated`,
    );
    await expectHubError(downloadModel({ repo: "org/none", revision: "main" }, opts()), "org/none:", "not found");
    await expectHubError(
      downloadModel({ repo: "org/tiny", revision: "v9" }, opts()),
      "org/tiny:",
      "revision v9 not found",
    );
    await expectHubError(
      downloadModel({ repo: "org/no-tokenizer", revision: "main" }, opts()),
      "org/no-tokenizer/tokenizer.json:",
      "not in the repo",
    );
    await expectHubError(
      downloadModel({ repo: "org/bin-only", revision: "main" }, opts()),
      "org/bin-only:",
      "no model.safetensors",
    );
  });

  it("reports a full disk with the file it was writing", async () => {
    // /dev/full answers every write with ENOSPC: put it where the transfer appends.
    const { createHash } = await import("node:crypto");
    const sha = createHash("sha256").update(single.files["model.safetensors"]).digest("hex");
    const blobs = join(cache, "models--org--tiny", "blobs");
    mkdirSync(blobs, { recursive: true });
    symlinkSync("/dev/full", join(blobs, `${sha}.incomplete`));
    await expectHubError(
      downloadModel({ repo: "org/tiny", revision: "main" }, opts()),
      "org/tiny/model.safetensors:",
      "no space left on the device",
    );
  });
});

describe("downloadProgressReporter", () => {
  it("logs bytes, share and rate when not on a terminal", () => {
    const lines: string[] = [];
    const r = downloadProgressReporter({ tty: false, log: (m) => lines.push(m), intervalMs: 0 });
    r.update({ repo: "org/m", file: "model.safetensors", bytes: 512 * 1024 ** 2, totalBytes: 2 * 1024 ** 3 });
    r.done();
    expect(lines[0]).toMatch(/^downloading org\/m: 512\.0 MiB of 2\.00 GiB \(25 %\), .*\/s$/);
    expect(lines).toHaveLength(2);
  });
});
