/**
 * The admin API with the admin secret. Every call goes to `/admin/…`: the secret is sent only as the bearer
 * header of admin calls, never to the public API and never in a URL.
 *
 * @module
 */
import { errorFromResponse } from "./api-error.ts";
import type { CreatedKey, KeyInfo, Limits, UsageReport } from "./types.ts";

export class AdminApi {
  constructor(private readonly secret: string) {}

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await fetch(`/admin${path}`, {
      method,
      headers: { authorization: `Bearer ${this.secret}`, "content-type": "application/json" },
      credentials: "omit",
      cache: "no-store",
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
    if (!res.ok) throw await errorFromResponse(res);
    return (await res.json()) as T;
  }

  async listKeys(): Promise<KeyInfo[]> {
    return (await this.call<{ data: KeyInfo[] }>("GET", "/keys")).data;
  }

  createKey(name: string, limits: Partial<Limits>): Promise<CreatedKey> {
    return this.call("POST", "/keys", { name, limits });
  }

  updateKey(id: string, patch: { name?: string; limits?: Partial<Limits> }): Promise<KeyInfo> {
    return this.call("PATCH", `/keys/${encodeURIComponent(id)}`, patch);
  }

  revokeKey(id: string): Promise<KeyInfo> {
    return this.call("DELETE", `/keys/${encodeURIComponent(id)}`);
  }

  keyUsage(id: string, range: { start: string; end: string }): Promise<UsageReport> {
    return this.call("GET", `/keys/${encodeURIComponent(id)}/usage?start_date=${range.start}&end_date=${range.end}`);
  }
}
