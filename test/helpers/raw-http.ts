/**
 * One HTTP request with full control of the body's framing: a Content-Length, or chunked in `chunks` pieces.
 * A server may answer before reading the whole body (a 413 for an oversized upload) and close the connection:
 * the answer counts, and the write error that follows is ignored. Failing without an answer is an error.
 *
 * @module
 */
import { request } from "node:http";

export interface RawResponse {
  status: number;
  contentType: string;
  text: string;
}

export function sendRaw(
  url: string,
  opts: { method?: string; headers?: Record<string, string>; body: Buffer; chunks?: number },
): Promise<RawResponse> {
  const chunks = opts.chunks ?? 0;
  return new Promise((resolve, reject) => {
    let answered = false;
    const req = request(url, {
      method: opts.method ?? "POST",
      agent: false,
      headers: { ...opts.headers, ...(chunks === 0 ? { "content-length": String(opts.body.length) } : {}) },
    });
    req.on("response", (res) => {
      answered = true;
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => {
        text += d;
      });
      res.on("end", () =>
        resolve({ status: res.statusCode ?? 0, contentType: String(res.headers["content-type"] ?? ""), text }),
      );
      res.on("error", reject);
    });
    req.on("error", (e) => {
      if (!answered) reject(e);
    });
    const size = chunks === 0 ? 64 * 1024 : Math.max(1, Math.ceil(opts.body.length / chunks));
    for (let i = 0; i < opts.body.length; i += size) req.write(opts.body.subarray(i, i + size));
    req.end();
  });
}
