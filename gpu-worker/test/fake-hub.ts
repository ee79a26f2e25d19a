/**
 * A local stand-in for the Hugging Face Hub, speaking its HTTP API as huggingface_hub and @huggingface/hub use it:
 *   GET  /api/models/{repo}/revision/{rev}   { id, sha, siblings: [{ rfilename }], gated, private }
 *   GET  /api/models/{repo}/tree/{rev}       [{ type, path, size, oid, lfs?: { oid, size, pointerSize } }]
 *   HEAD /{repo}/resolve/{rev}/{file}        ETag, X-Repo-Commit, Content-Length, Accept-Ranges
 *   GET  /{repo}/resolve/{rev}/{file}        the bytes, with Range (206 + Content-Range)
 * LFS files redirect to a `/cdn/` URL as the Hub does, with `X-Linked-Etag` (their sha256) and `X-Linked-Size`.
 * Errors carry the Hub's `X-Error-Code` (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound).
 *
 * Faults for the tests: cut a file's transfer after some bytes, serve corrupted bytes, fail requests with a status.
 * Every request is recorded.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export interface FakeRepo {
  /** Path → bytes. */
  files: Record<string, Uint8Array>;
  /** Paths stored with LFS (default: every *.safetensors and *.bin). */
  lfs?: (path: string) => boolean;
  /** Branch → commit sha; default { main: <derived from the files> }. */
  refs?: Record<string, string>;
  /** Only requests with `Authorization: Bearer <token>` may read it (gated: 403 GatedRepo for other tokens). */
  token?: string;
  gated?: boolean;
}

export interface Fault {
  /** Close the connection after this many bytes of the body (once per fault). */
  cutAfterBytes?: number;
  /** Flip a byte of the body. */
  corrupt?: boolean;
  /** Answer with this status instead. */
  status?: number;
  /** Send the headers, then nothing (a download that hangs). */
  stall?: boolean;
  /** How many requests it applies to (default 1). */
  times?: number;
}

export interface RecordedRequest {
  method: string;
  path: string;
  range?: string;
  authorization?: string;
}

export interface FakeHub {
  url: string;
  requests: RecordedRequest[];
  /** Applies `fault` to the next download(s) of `repo`'s `file`. */
  fault(repo: string, file: string, fault: Fault): void;
  /** Fails every request (status) or resets the connection of every request (0) until called with null. */
  down(status: number | null): void;
  close(): Promise<void>;
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");
/** Git's blob id: sha1 of "blob <size>\0" + content, what the Hub reports as `oid` of a regular file. */
const gitOid = (b: Uint8Array) => createHash("sha1").update(`blob ${b.byteLength}\0`).update(b).digest("hex");

export async function startFakeHub(repos: Record<string, FakeRepo>): Promise<FakeHub> {
  const requests: RecordedRequest[] = [];
  const faults = new Map<string, Fault>();
  let downStatus: number | null = null;
  const isLfs = (repo: FakeRepo, path: string) => (repo.lfs ?? ((p) => /\.(safetensors|bin|pth)$/.test(p)))(path);
  const commitOf = (repo: FakeRepo, rev: string): string | undefined => {
    const refs = repo.refs ?? {
      main: createHash("sha1")
        .update(JSON.stringify(Object.keys(repo.files).map((p) => [p, sha256(repo.files[p])])))
        .digest("hex"),
    };
    if (refs[rev]) return refs[rev];
    return Object.values(refs).includes(rev) ? rev : undefined;
  };

  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? "/", "http://hub");
    const path = decodeURIComponent(url.pathname);
    requests.push({
      method: req.method ?? "GET",
      path,
      range: req.headers.range,
      authorization: req.headers.authorization,
    });
    if (downStatus === 0) return req.socket.destroy();
    if (downStatus !== null) return error(res, downStatus, "Unavailable", "the hub is down");

    if (path.startsWith("/cdn/")) return serveCdn(req, res, path.slice(5));
    const api = /^\/api\/models\/([^/]+\/[^/]+)\/(revision|tree)\/([^/]+)$/.exec(path);
    const resolve = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(path);
    const repoId = api?.[1] ?? resolve?.[1];
    const repo = repoId ? repos[repoId] : undefined;
    if (!repoId || !repo) return error(res, 401, "RepoNotFound", "Repository not found");
    const auth = req.headers.authorization;
    if (repo.token && auth !== `Bearer ${repo.token}`) {
      if (repo.gated && auth) return error(res, 403, "GatedRepo", `Access to model ${repoId} is restricted`);
      return error(res, 401, repo.gated ? "GatedRepo" : "RepoNotFound", "Repository not found");
    }
    const rev = api?.[3] ?? resolve?.[2] ?? "main";
    const commit = commitOf(repo, rev);
    if (!commit) return error(res, 404, "RevisionNotFound", `Invalid rev id: ${rev}`);

    if (api?.[2] === "revision") {
      return json(res, {
        _id: `id-${repoId}`,
        id: repoId,
        sha: commit,
        private: repo.token !== undefined,
        gated: repo.gated ? "manual" : false,
        siblings: Object.keys(repo.files).map((rfilename) => ({ rfilename })),
      });
    }
    if (api?.[2] === "tree") {
      const top = Object.keys(repo.files).filter((p) => !p.includes("/"));
      const dirs = [...new Set(Object.keys(repo.files).flatMap((p) => (p.includes("/") ? [p.split("/")[0]] : [])))];
      return json(res, [
        ...dirs.map((d) => ({ type: "directory", path: d, size: 0, oid: gitOid(new Uint8Array()) })),
        ...top.map((p) => {
          const b = repo.files[p];
          const entry: Record<string, unknown> = { type: "file", path: p, size: b.byteLength, oid: gitOid(b) };
          if (isLfs(repo, p)) entry.lfs = { oid: sha256(b), size: b.byteLength, pointerSize: 134 };
          return entry;
        }),
      ]);
    }
    const file = resolve?.[3] ?? "";
    const bytes = repo.files[file];
    if (!bytes) return error(res, 404, "EntryNotFound", `${file} does not exist on "${rev}"`);
    const headers = { "x-repo-commit": commit };
    if (isLfs(repo, file)) {
      const hash = sha256(bytes);
      cdn.set(hash, { bytes, key: `${repoId}/${file}` });
      res.writeHead(302, {
        ...headers,
        location: `/cdn/${hash}`,
        "x-linked-etag": `"${hash}"`,
        "x-linked-size": String(bytes.byteLength),
      });
      return res.end();
    }
    return serveBytes(req, res, bytes, `"${gitOid(bytes)}"`, `${repoId}/${file}`, headers);
  });

  const cdn = new Map<string, { bytes: Uint8Array; key: string }>();
  function serveCdn(req: IncomingMessage, res: ServerResponse, hash: string): void {
    const blob = cdn.get(hash);
    if (!blob) return void error(res, 404, "EntryNotFound", "no such object");
    serveBytes(req, res, blob.bytes, `"${hash}"`, blob.key, {});
  }

  function serveBytes(
    req: IncomingMessage,
    res: ServerResponse,
    bytes: Uint8Array,
    etag: string,
    key: string,
    extra: Record<string, string>,
  ): void {
    const headers: Record<string, string> = { ...extra, etag, "accept-ranges": "bytes" };
    let start = 0;
    let end = bytes.byteLength - 1;
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? "");
    if (range) {
      start = Number(range[1]);
      end = range[2] ? Math.min(Number(range[2]), end) : end;
      if (start >= bytes.byteLength) {
        res.writeHead(416, { ...headers, "content-range": `bytes */${bytes.byteLength}` });
        return void res.end();
      }
      headers["content-range"] = `bytes ${start}-${end}/${bytes.byteLength}`;
    }
    headers["content-length"] = String(end - start + 1);
    if (req.method === "HEAD") {
      res.writeHead(range ? 206 : 200, headers);
      return void res.end();
    }
    let body = bytes.subarray(start, end + 1);
    const fault = takeFault(key, body.byteLength);
    if (fault?.status) return void error(res, fault.status, "Fault", "injected failure");
    if (fault?.corrupt) {
      body = Uint8Array.from(body);
      body[body.byteLength >> 1] ^= 0xff;
    }
    res.writeHead(range ? 206 : 200, headers);
    if (fault?.stall) return void res.flushHeaders();
    if (fault?.cutAfterBytes !== undefined) {
      // FIN, not RST: a reset would make the client's kernel drop bytes it has not read yet.
      res.write(body.subarray(0, fault.cutAfterBytes), () => req.socket.end());
      return;
    }
    res.end(body);
  }

  /** Faults apply to transfers of more than one byte (the clients' `Range: bytes=0-0` probes pass through). */
  function takeFault(key: string, length: number): Fault | undefined {
    const f = faults.get(key);
    if (!f || length <= 1) return undefined;
    const times = (f.times ?? 1) - 1;
    if (times <= 0) faults.delete(key);
    else faults.set(key, { ...f, times });
    return f;
  }

  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    requests,
    fault: (repo, file, fault) => void faults.set(`${repo}/${file}`, fault),
    down: (status) => {
      downStatus = status;
    },
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

function json(res: ServerResponse, value: unknown): void {
  res.writeHead(200, { "content-type": "application/json" });
  res.end(JSON.stringify(value));
}

function error(res: ServerResponse, status: number, code: string, message: string): void {
  res.writeHead(status, { "content-type": "application/json", "x-error-code": code, "x-error-message": message });
  res.end(JSON.stringify({ error: message }));
}
