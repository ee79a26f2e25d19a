/**
 * Models by name: `org/name[@revision]` downloaded from the Hugging Face Hub into huggingface_hub's cache layout,
 * so a cache filled by Python tools is reused here and ours is reused by them:
 *
 *   <cache>/models--org--name/refs/<revision>              the commit the revision resolved to
 *   <cache>/models--org--name/blobs/<etag>                 contents (etag: sha256 for LFS files, git oid otherwise)
 *   <cache>/models--org--name/snapshots/<commit>/<file>    relative symlinks to the blobs: the model directory
 *
 * Only the files serving reads are fetched: config.json, generation_config.json, tokenizer.json,
 * tokenizer_config.json, and model.safetensors or the index with its shards (what safetensors.ts opens). A transfer
 * goes to `blobs/<etag>.incomplete` and resumes from there (HTTP Range) after a failure or a restart; a blob is
 * renamed into place only once its size, and for LFS files its sha256, match the Hub's listing. Several processes
 * sharing a cache take a lock per blob. Failures are retried with backoff; what is left is a `HubError`, one line
 * naming the repo and the file.
 *
 * The Hub's API calls go through `@huggingface/hub` (model info, tree listing, file resolution); the byte transfer
 * is a plain ranged GET, because resuming and verifying is what that library does not do.
 *
 * @example
 * const { dir } = await downloadModel({ repo: "TinyLlama/TinyLlama-1.1B-Chat-v1.0", revision: "main" });
 *
 * @module
 */
import { createHash, type Hash } from "node:crypto";
import { createReadStream, existsSync, readFileSync } from "node:fs";
import { mkdir, open, readFile, rename, rm, stat, symlink, truncate, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileDownloadInfo, HubApiError, type ListFileEntry, listFiles, modelInfo } from "@huggingface/hub";
import lockfile from "proper-lockfile";
import { ModelLoadError } from "./errors.ts";

/** A model on the Hub: `org/name` and a branch, tag or commit. */
export interface HubRef {
  repo: string;
  revision: string;
}

/** Where the Hub is, who we are, where the cache lives: huggingface_hub's environment variables. */
export interface HubSettings {
  /** `HF_ENDPOINT`, default https://huggingface.co. */
  endpoint: string;
  /** `HF_TOKEN`, else the token `huggingface-cli login` saved under HF_HOME. */
  token?: string;
  /** `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`. */
  cacheDir: string;
  /** `HF_HUB_OFFLINE`: use the cache only. */
  offline: boolean;
}

export interface DownloadProgress {
  repo: string;
  /** The file whose bytes just arrived. */
  file: string;
  /** Bytes present of all the files to fetch (cached ones included), and their total. */
  bytes: number;
  totalBytes: number;
}

export interface DownloadOptions extends Partial<HubSettings> {
  onProgress?: (p: DownloadProgress) => void;
  /** Non-fatal events worth a log line: a retry, serving from the cache because the Hub is unreachable. */
  onWarning?: (message: string) => void;
  /** Attempts per request before giving up. Default 5. */
  attempts?: number;
  /** First retry delay; doubles each attempt, at most 30 s. Default 1000. */
  retryDelayMs?: number;
  /** A transfer that receives nothing for this long is retried. Default 60 s. */
  stallTimeoutMs?: number;
  /** Files downloaded at once. Default 4. */
  concurrency?: number;
}

export interface DownloadedModel {
  /** The snapshot directory: a checkpoint directory like any other. */
  dir: string;
  repo: string;
  revision: string;
  commit: string;
  /** Bytes transferred by this call (0 when everything was cached). */
  downloadedBytes: number;
}

/** A download that failed for good. The message names the repo and, where one is involved, the file. */
export class HubError extends ModelLoadError {
  override name = "HubError";
  constructor(
    readonly repo: string,
    readonly path: string | undefined,
    message: string,
  ) {
    super(path ? `${repo}/${path}` : repo, message);
  }
}

const REPO_ID = /^[A-Za-z0-9][\w.-]*\/[A-Za-z0-9][\w.-]*$/;
const COMMIT = /^[0-9a-f]{40}$/;

/** `org/name` or `org/name@revision`; null for anything else (a local path, say). */
export function parseHubRef(spec: string): HubRef | null {
  const at = spec.indexOf("@");
  const repo = at < 0 ? spec : spec.slice(0, at);
  const revision = at < 0 ? "main" : spec.slice(at + 1);
  if (!REPO_ID.test(repo) || repo.includes("..") || revision === "" || /\s|\.\./.test(revision)) return null;
  return { repo, revision };
}

export function hubSettingsFromEnv(env: NodeJS.ProcessEnv = process.env): HubSettings {
  const hfHome = env.HF_HOME || join(env.XDG_CACHE_HOME || join(homedir(), ".cache"), "huggingface");
  return {
    endpoint: (env.HF_ENDPOINT || "https://huggingface.co").replace(/\/+$/, ""),
    token: env.HF_TOKEN || readTokenFile(env.HF_TOKEN_PATH || join(hfHome, "token")),
    cacheDir: env.HF_HUB_CACHE || join(hfHome, "hub"),
    offline: ["1", "on", "yes", "true"].includes((env.HF_HUB_OFFLINE ?? "").toLowerCase()),
  };
}

function readTokenFile(file: string): string | undefined {
  try {
    return readFileSync(file, "utf8").trim() || undefined;
  } catch {
    return undefined;
  }
}

/** The snapshot directory of `ref` in the cache if it is there in full, without asking the Hub. */
export function cachedSnapshot(ref: HubRef, cacheDir = hubSettingsFromEnv().cacheDir): string | null {
  const storage = join(cacheDir, repoFolder(ref.repo));
  let commit = ref.revision;
  if (!COMMIT.test(commit)) {
    try {
      commit = readFileSync(join(storage, "refs", ref.revision), "utf8").trim();
    } catch {
      return null;
    }
  }
  const dir = join(storage, "snapshots", commit);
  return isCompleteCheckpoint(dir) ? dir : null;
}

/** Downloads what serving `ref` needs (or finds it cached) and returns its snapshot directory. */
export async function downloadModel(ref: HubRef, options: DownloadOptions = {}): Promise<DownloadedModel> {
  const defined = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined));
  return new ModelDownload(ref, { ...hubSettingsFromEnv(), ...defined }).run();
}

// ---------------------------------------------------------------------------------------------------------------

const CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"];
const REQUIRED_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json"];
const SINGLE_WEIGHTS = "model.safetensors";
const WEIGHTS_INDEX = "model.safetensors.index.json";

const repoFolder = (repo: string) => `models--${repo.split("/").join("--")}`;

/** What safetensors.ts and the tokenizer will open: the config and tokenizer files, and every weights file. */
function isCompleteCheckpoint(dir: string): boolean {
  if (!REQUIRED_FILES.every((f) => existsSync(join(dir, f)))) return false;
  if (existsSync(join(dir, SINGLE_WEIGHTS))) return true;
  try {
    return shardsOf(JSON.parse(readFileSync(join(dir, WEIGHTS_INDEX), "utf8"))).every((f) => existsSync(join(dir, f)));
  } catch {
    return false;
  }
}

function shardsOf(index: unknown): string[] {
  const map = (index as { weight_map?: unknown })?.weight_map;
  if (typeof map !== "object" || map === null) throw new Error("no weight_map object");
  return [...new Set(Object.values(map as Record<string, unknown>).map(String))].sort();
}

/** A failure worth another attempt: the network, the server's 5xx/429, a cut or corrupted transfer. */
class TransientError extends Error {}

interface FileEntry {
  path: string;
  size: number;
  /** Blob name in the cache: sha256 for LFS files, git oid otherwise. */
  etag: string;
  /** Expected sha256, for LFS files. */
  sha256?: string;
}

class ModelDownload {
  readonly #repo: string;
  readonly #revision: string;
  readonly #s: HubSettings & DownloadOptions;
  readonly #storage: string;
  /** X-Error-Code of failed responses, by URL: what tells a gated repo from a missing one. */
  readonly #errorCodes = new Map<string, string>();
  #bytes = 0;
  #totalBytes = 0;
  #downloaded = 0;

  constructor(ref: HubRef, settings: HubSettings & DownloadOptions) {
    this.#repo = ref.repo;
    this.#revision = ref.revision;
    this.#s = settings;
    this.#storage = join(settings.cacheDir, repoFolder(ref.repo));
  }

  async run(): Promise<DownloadedModel> {
    if (this.#s.offline) {
      const dir = cachedSnapshot({ repo: this.#repo, revision: this.#revision }, this.#s.cacheDir);
      if (!dir)
        throw this.#error(
          undefined,
          `HF_HUB_OFFLINE is set and revision ${this.#revision} is not cached in full in ${this.#storage}`,
        );
      return this.#result(dir);
    }
    if (COMMIT.test(this.#revision)) {
      const dir = cachedSnapshot({ repo: this.#repo, revision: this.#revision }, this.#s.cacheDir);
      if (dir) return this.#result(dir);
    }

    let commit: string;
    let siblings: Set<string>;
    try {
      const info = await this.#attempt(undefined, () =>
        modelInfo({
          name: this.#repo,
          revision: this.#revision,
          hubUrl: this.#s.endpoint,
          fetch: this.#fetch,
          additionalFields: ["sha", "filePaths"],
        }),
      );
      commit = info.sha;
      siblings = new Set(info.filePaths);
    } catch (e) {
      // The Hub is unreachable but the revision was downloaded before: serve it, as huggingface_hub does.
      const cached = e instanceof HubError && e.cause instanceof TransientError ? this.#cachedOrNull() : null;
      if (!cached) throw e;
      this.#s.onWarning?.(`${(e as Error).message}; using the cached snapshot ${cached}`);
      return this.#result(cached);
    }
    if (!COMMIT.test(commit ?? ""))
      throw this.#error(undefined, `the Hub returned no commit sha for ${this.#revision}`);
    const snapshot = join(this.#storage, "snapshots", commit);
    if (commit !== this.#revision) {
      await mkdir(join(this.#storage, "refs"), { recursive: true });
      await writeFile(join(this.#storage, "refs", this.#revision), commit);
    }

    for (const f of REQUIRED_FILES) {
      if (!siblings.has(f))
        throw this.#error(f, `not in the repo at ${this.#revision}; llama-edge needs ${REQUIRED_FILES.join(", ")}`);
    }
    const tree = await this.#listTree(commit);
    const entry = (path: string): FileEntry => {
      const e = tree.get(path);
      if (!e) throw this.#error(path, `listed by the repo but missing from its tree at ${commit}`);
      return e;
    };
    const configs = CONFIG_FILES.filter((f) => siblings.has(f)).map(entry);
    let weights: FileEntry[];
    if (siblings.has(SINGLE_WEIGHTS)) weights = [entry(SINGLE_WEIGHTS)];
    else if (siblings.has(WEIGHTS_INDEX)) {
      const index = entry(WEIGHTS_INDEX);
      this.#totalBytes = index.size;
      await this.#ensureFile(commit, index);
      let shards: string[];
      try {
        shards = shardsOf(JSON.parse(await readFile(join(snapshot, WEIGHTS_INDEX), "utf8")));
      } catch (e) {
        throw this.#error(WEIGHTS_INDEX, `invalid index: ${(e as Error).message}`);
      }
      for (const s of shards) {
        if (!siblings.has(s)) throw this.#error(s, `named by ${WEIGHTS_INDEX} but not in the repo`);
      }
      weights = [index, ...shards.map(entry)];
    } else {
      const bins = [...siblings].filter((f) => /\.(bin|pth|pt)$/.test(f) && !f.includes("/"));
      throw this.#error(
        undefined,
        `no ${SINGLE_WEIGHTS} or ${WEIGHTS_INDEX} at ${this.#revision}` +
          (bins.length > 0 ? ` (found ${bins.slice(0, 3).join(", ")}: llama-edge reads safetensors only)` : ""),
      );
    }
    const files = [...configs, ...weights];
    this.#totalBytes = files.reduce((n, f) => n + f.size, 0);
    this.#bytes = 0;
    await runPool(files, this.#s.concurrency ?? 4, (f) => this.#ensureFile(commit, f));
    return this.#result(snapshot, commit);
  }

  #result(dir: string, commit = dir.split("/").pop() ?? ""): DownloadedModel {
    return { dir, repo: this.#repo, revision: this.#revision, commit, downloadedBytes: this.#downloaded };
  }

  #cachedOrNull(): string | null {
    return cachedSnapshot({ repo: this.#repo, revision: this.#revision }, this.#s.cacheDir);
  }

  async #listTree(commit: string): Promise<Map<string, FileEntry>> {
    const entries = await this.#attempt(undefined, async () => {
      const out: ListFileEntry[] = [];
      for await (const e of listFiles({
        repo: this.#repo,
        revision: commit,
        hubUrl: this.#s.endpoint,
        fetch: this.#fetch,
      }))
        out.push(e);
      return out;
    });
    const tree = new Map<string, FileEntry>();
    for (const e of entries) {
      if (e.type !== "file") continue;
      const sha256 = e.lfs?.oid;
      const etag = sha256 ?? e.oid;
      if (!etag) throw this.#error(e.path, "the Hub's tree listing has no oid for it");
      tree.set(e.path, { path: e.path, size: e.lfs?.size ?? e.size, etag, sha256 });
    }
    return tree;
  }

  /** Makes `snapshots/<commit>/<path>` point at a verified blob, downloading the blob if it is not cached. */
  async #ensureFile(commit: string, f: FileEntry): Promise<void> {
    const pointer = join(this.#storage, "snapshots", commit, f.path);
    const blob = join(this.#storage, "blobs", f.etag);
    if (existsSync(pointer)) return this.#progress(f.path, f.size);
    await mkdir(dirname(blob), { recursive: true });
    await mkdir(dirname(pointer), { recursive: true });
    let counted = false; // a transfer reports its own bytes
    if (!existsSync(blob)) {
      const locks = join(this.#s.cacheDir, ".locks", repoFolder(this.#repo));
      await mkdir(locks, { recursive: true });
      // Another process sharing the cache may be downloading the same blob: wait for it, then find it done.
      const release = await lockfile.lock(blob, {
        realpath: false,
        lockfilePath: join(locks, `${f.etag}.llama-edge.lock`),
        stale: 60_000,
        update: 10_000,
        retries: { retries: 10_000, minTimeout: 200, maxTimeout: 2000 },
      });
      try {
        if (!existsSync(blob)) {
          await this.#download(commit, f, blob);
          counted = true;
        }
      } finally {
        await release().catch(() => {});
      }
    }
    await rm(pointer, { force: true });
    await symlink(relative(dirname(pointer), blob), pointer);
    if (!counted) this.#progress(f.path, f.size);
  }

  #progress(file: string, delta: number): void {
    this.#bytes += delta;
    this.#s.onProgress?.({ repo: this.#repo, file, bytes: this.#bytes, totalBytes: this.#totalBytes });
  }

  async #download(commit: string, f: FileEntry, blob: string): Promise<void> {
    const incomplete = `${blob}.incomplete`;
    const info = await this.#attempt(f.path, () =>
      fileDownloadInfo({
        repo: this.#repo,
        path: f.path,
        revision: commit,
        hubUrl: this.#s.endpoint,
        fetch: this.#fetch,
      }),
    );
    if (!info) throw this.#error(f.path, `not found at ${commit}`);
    if (info.size !== f.size) throw this.#error(f.path, `the Hub serves ${info.size} bytes but lists ${f.size}`);
    await this.#attempt(f.path, async () => {
      const hash = await this.#transfer(info.url, f, incomplete);
      const size = (await stat(incomplete)).size;
      // Short (the body ended early): keep it, the next attempt resumes. Wrong: start over, none of it is trusted.
      if (size < f.size) throw new TransientError(`got ${size} of ${f.size} bytes`);
      const got = hash?.digest("hex");
      if (size > f.size || got !== f.sha256) {
        await rm(incomplete, { force: true });
        throw new TransientError(
          size > f.size ? `got ${size} bytes, expected ${f.size}` : `sha256 mismatch: got ${got}, expected ${f.sha256}`,
        );
      }
    });
    await rename(incomplete, blob);
  }

  /**
   * One attempt at appending the rest of the file to `incomplete`. Returns the running sha256 of the whole file
   * (LFS files), which the bytes already there were fed into first.
   */
  async #transfer(url: string, f: FileEntry, incomplete: string): Promise<Hash | null> {
    let offset = await stat(incomplete).then(
      (s) => s.size,
      () => 0,
    );
    if (offset > f.size) {
      await truncate(incomplete, 0);
      offset = 0;
    }
    const hash = f.sha256 ? createHash("sha256") : null;
    if (hash && offset > 0) {
      for await (const chunk of createReadStream(incomplete, { end: offset - 1 })) hash.update(chunk as Buffer);
    }
    this.#progress(f.path, offset);
    let received = 0;
    try {
      if (offset === f.size) return hash;
      const ac = new AbortController();
      const stallMs = this.#s.stallTimeoutMs ?? 60_000;
      let stall = setTimeout(() => ac.abort(), stallMs);
      const res = await this.#fetch(url, { headers: { range: `bytes=${offset}-` }, signal: ac.signal }).catch((e) => {
        throw new TransientError(`request failed: ${causeOf(e)}`);
      });
      const resumed = res.status === 206;
      if (!res.ok) {
        await res.body?.cancel();
        if (res.status === 416) await truncate(incomplete, 0); // what we hold is longer than the file: start over
        throw httpError(res.status, res.headers.get("x-error-code"));
      }
      if (offset > 0 && !resumed) {
        // The server ignored the range: start the file over.
        await truncate(incomplete, 0);
        await res.body?.cancel();
        throw new TransientError("the server ignored the Range request");
      }
      const fh = await open(incomplete, "a");
      try {
        for await (const chunk of res.body ?? []) {
          clearTimeout(stall);
          stall = setTimeout(() => ac.abort(), stallMs);
          const bytes = chunk as Uint8Array;
          if (offset + received + bytes.byteLength > f.size)
            throw new TransientError(`more than the ${f.size} bytes listed`);
          await fh.write(bytes);
          hash?.update(bytes);
          received += bytes.byteLength;
          this.#downloaded += bytes.byteLength;
          this.#progress(f.path, bytes.byteLength);
        }
      } catch (e) {
        if (e instanceof TransientError || isDiskError(e)) throw e;
        throw new TransientError(ac.signal.aborted ? `no data for ${stallMs / 1000} s` : `transfer cut: ${causeOf(e)}`);
      } finally {
        clearTimeout(stall);
        await fh.close();
      }
      return hash;
    } catch (e) {
      // What this attempt added stays in `incomplete` for the next one; the progress total must not count it twice.
      this.#progress(f.path, -(offset + received));
      throw e;
    }
  }

  /** Runs `fn`, retrying transient failures with backoff; anything else becomes a HubError at once. */
  async #attempt<T>(path: string | undefined, fn: () => Promise<T>): Promise<T> {
    const attempts = this.#s.attempts ?? 5;
    for (let i = 1; ; i++) {
      try {
        return await fn();
      } catch (raw) {
        const e = this.#classify(path, raw);
        if (e instanceof HubError) throw e;
        if (i >= attempts) {
          const what = path ? "download" : `request to ${this.#s.endpoint}`;
          throw this.#error(path, `${what} failed after ${attempts} attempts: ${e.message}`, e);
        }
        const delay = Math.min(30_000, (this.#s.retryDelayMs ?? 1000) * 2 ** (i - 1));
        this.#s.onWarning?.(`${this.#repo}${path ? `/${path}` : ""}: ${e.message}; retrying in ${delay / 1000} s`);
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  /** A TransientError to retry, or the HubError to report. */
  #classify(path: string | undefined, e: unknown): TransientError | HubError {
    if (e instanceof HubError || e instanceof TransientError) return e;
    if (isDiskError(e)) {
      const code = (e as NodeJS.ErrnoException).code;
      const what = code === "ENOSPC" ? "no space left on the device" : `cannot write (${code})`;
      return this.#error(path, `${what} in ${this.#s.cacheDir}; free space or point HF_HOME elsewhere`);
    }
    if (e instanceof HubApiError) {
      const refusal = httpError(e.statusCode, this.#errorCodes.get(e.url) ?? null);
      return refusal instanceof Refusal ? this.#refusal(path, refusal) : refusal;
    }
    if (e instanceof Refusal) return this.#refusal(path, e);
    return new TransientError(causeOf(e));
  }

  /** A 4xx in the terms a user acts on: which token, which revision, which file. */
  #refusal(path: string | undefined, r: Refusal): HubError {
    const tokenHint = this.#s.token ? "HF_TOKEN has no access to it" : "HF_TOKEN is not set";
    let message: string;
    if (r.code === "GatedRepo") {
      message = `gated repository: accept its conditions at ${this.#s.endpoint}/${this.#repo} and set HF_TOKEN to a token of an account with access`;
    } else if (r.code === "RepoNotFound" || (r.status === 401 && !r.code)) {
      message = `repository not found, or private and ${tokenHint}`;
    } else if (r.code === "RevisionNotFound") {
      message = `revision ${this.#revision} not found`;
    } else if (r.code === "EntryNotFound" || (r.status === 404 && path)) {
      message = `file not found at revision ${this.#revision}`;
    } else if (r.status === 403) {
      message = `access denied (${tokenHint})`;
    } else {
      message = "refused by the Hub";
    }
    return this.#error(path, `${message} (${r.message})`);
  }

  #error(path: string | undefined, message: string, cause?: Error): HubError {
    const err = new HubError(this.#repo, path, message);
    if (cause) err.cause = cause;
    return err;
  }

  /** fetch with the token (only towards the Hub itself) and a record of the Hub's error codes. */
  readonly #fetch = async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    const url = new URL(input instanceof Request ? input.url : String(input), this.#s.endpoint);
    const headers = new Headers(init?.headers);
    if (this.#s.token && url.origin === new URL(this.#s.endpoint).origin) {
      headers.set("authorization", `Bearer ${this.#s.token}`);
    }
    headers.set("user-agent", "llama-edge");
    const res = await fetch(url, { ...init, headers });
    if (!res.ok) this.#errorCodes.set(res.url || url.href, res.headers.get("x-error-code") ?? "");
    return res;
  };
}

/** An HTTP answer that retrying will not change (4xx): explained in the repo's terms by `#refusal`. */
class Refusal extends Error {
  constructor(
    readonly status: number,
    readonly code: string | null,
  ) {
    super(`HTTP ${status}${code ? ` ${code}` : ""}`);
  }
}

function httpError(status: number, code: string | null): TransientError | Refusal {
  if (status >= 500 || status === 429 || status === 408) return new TransientError(`HTTP ${status}`);
  return new Refusal(status, code);
}

function isDiskError(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException)?.code;
  return code === "ENOSPC" || code === "EDQUOT" || code === "EROFS" || code === "EACCES";
}

function causeOf(e: unknown): string {
  const err = e as Error & { cause?: { code?: string; message?: string } };
  const cause = err?.cause?.code ?? err?.cause?.message;
  return cause ? `${err.message} (${cause})` : (err?.message ?? String(e));
}

async function runPool<T>(items: T[], concurrency: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed: unknown;
  const worker = async () => {
    while (next < items.length && failed === undefined) {
      const item = items[next++];
      try {
        await fn(item);
      } catch (e) {
        failed ??= e;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
  if (failed !== undefined) throw failed;
}
