/**
 * Errors from the gateway as the console shows them: OpenAI's `{"error": {message, type, param, code}}` plus the
 * HTTP status and, on 429, how long to wait (retry-after / retry-after-ms).
 *
 * @module
 */

export class ApiError extends Error {
  constructor(
    message: string,
    /** HTTP status; 0 when the request never got an answer (network down, gateway stopped). */
    readonly status: number,
    readonly code: string | null = null,
    readonly param: string | null = null,
    /** Seconds to wait before retrying, from a 429's retry-after headers. */
    readonly retryAfterS: number | null = null,
  ) {
    super(message);
    this.name = "ApiError";
  }

  /** One line a person can act on: "429 rate_limit_exceeded: … Retry in 42 s." */
  describe(): string {
    // A stream's final error event comes after a 200: only an error status says something.
    const head = [this.status >= 400 ? this.status : null, this.code].filter((x) => x !== null && x !== "").join(" ");
    const retry = this.retryAfterS !== null ? ` Retry in ${this.retryAfterS} s.` : "";
    return `${head ? `${head}: ` : ""}${this.message}${retry}`;
  }
}

interface OpenAIErrorBody {
  error?: { message?: unknown; code?: unknown; param?: unknown };
}

/** The error of a failed response (any status ≥ 400), read from its OpenAI-shaped body when it has one. */
export async function errorFromResponse(res: Response): Promise<ApiError> {
  let body: OpenAIErrorBody | undefined;
  try {
    body = (await res.json()) as OpenAIErrorBody;
  } catch {
    // not JSON (a proxy's HTML page): fall back to the status text
  }
  return errorFromBody(body, res.status, res.headers);
}

/** The error carried in a JSON body: a failed response's, or a stream's final `data: {"error": …}` event. */
export function errorFromBody(body: OpenAIErrorBody | undefined, status: number, headers?: Headers): ApiError {
  const e = body?.error;
  const message = typeof e?.message === "string" ? e.message : `The gateway answered ${status}.`;
  const code = typeof e?.code === "string" ? e.code : null;
  const param = typeof e?.param === "string" ? e.param : null;
  return new ApiError(message, status, code, param, retryAfter(headers));
}

function retryAfter(headers: Headers | undefined): number | null {
  const ms = Number(headers?.get("retry-after-ms") ?? Number.NaN);
  if (Number.isFinite(ms)) return Math.max(1, Math.ceil(ms / 1000));
  const s = Number(headers?.get("retry-after") ?? Number.NaN);
  return Number.isFinite(s) ? s : null;
}

/** Any thrown value as an ApiError (a failed fetch becomes status 0). */
export function asApiError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  return new ApiError(e instanceof Error ? e.message : String(e), 0);
}
