// CORS as a browser exercises it: real preflights (OPTIONS with Origin and Access-Control-Request-*), then the
// actual requests, whose answers (errors included) a page may only read with the right headers.
import { exports } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { EXPOSED_HEADERS } from "../src/middleware/cors.ts";
import { chat, makeApp, newKey, post, testConfig } from "./helpers.ts";

const PAGE = "https://chat.example.com";

/** The headers the official `openai` SDK sends from a browser (dangerouslyAllowBrowser), as a preflight lists them. */
const SDK_HEADERS = [
  "authorization",
  "content-type",
  "x-stainless-arch",
  "x-stainless-lang",
  "x-stainless-os",
  "x-stainless-package-version",
  "x-stainless-retry-count",
  "x-stainless-runtime",
  "x-stainless-runtime-version",
  "x-stainless-timeout",
  "openai-organization",
  "openai-project",
];

const preflight = (path: string, origin: string, headers: string[]) =>
  new Request(`http://gateway${path}`, {
    method: "OPTIONS",
    headers: {
      origin,
      "access-control-request-method": "POST",
      "access-control-request-headers": headers.join(", "),
    },
  });

function expectReadableFrom(res: Response, origin: string) {
  expect(res.headers.get("access-control-allow-origin")).toBe(origin);
  const exposed = (res.headers.get("access-control-expose-headers") ?? "").split(",");
  expect(exposed).toEqual(expect.arrayContaining(EXPOSED_HEADERS));
}

describe("CORS", () => {
  it("answers the openai SDK's preflight through the Workers entry, allowing its headers and no others", async () => {
    const res = await exports.default.fetch(
      preflight("/v1/chat/completions", PAGE, [...SDK_HEADERS, "x-evil-header", "cookie"]),
    );
    expect(res.status).toBe(204);
    expect(res.headers.get("access-control-allow-origin")).toBe("*");
    expect(res.headers.get("access-control-allow-methods")).toContain("POST");
    const allowed = (res.headers.get("access-control-allow-headers") ?? "").split(",");
    expect(allowed.sort()).toEqual([...SDK_HEADERS].sort());
    expect(Number(res.headers.get("access-control-max-age"))).toBeGreaterThan(0);
  });

  it("allows only the configured origins", async () => {
    const { app } = makeApp(undefined, { ...testConfig, cors_origins: [PAGE] });
    const ok = await app.request(preflight("/v1/models", PAGE, ["authorization"]));
    expect(ok.headers.get("access-control-allow-origin")).toBe(PAGE);
    expect(ok.headers.get("vary")).toContain("Origin");
    const other = await app.request(preflight("/v1/models", "https://evil.example", ["authorization"]));
    expect(other.headers.get("access-control-allow-origin")).toBeNull();
    const { key } = await newKey();
    const actual = await app.request(post("/v1/chat/completions", key, chat(), { origin: "https://evil.example" }));
    expect(actual.headers.get("access-control-allow-origin")).toBeNull();
  });

  it("lets a page read successes, 401s and 429s with their rate-limit headers", async () => {
    const { app } = makeApp(undefined, { ...testConfig, cors_origins: [PAGE] });
    const { key } = await newKey({ rpm: 1 });
    const ok = await app.request(post("/v1/chat/completions", key, chat(), { origin: PAGE }));
    expect(ok.status).toBe(200);
    expectReadableFrom(ok, PAGE);
    const limited = await app.request(post("/v1/chat/completions", key, chat(), { origin: PAGE }));
    expect(limited.status).toBe(429);
    expectReadableFrom(limited, PAGE);
    expect(limited.headers.get("x-ratelimit-limit-requests")).toBe("1");

    const missing = await app.request(post("/v1/chat/completions", undefined, chat(), { origin: PAGE }));
    expect(missing.status).toBe(401);
    expectReadableFrom(missing, PAGE);
    // An unknown key with a broken body: the 401 replaces the 400 (OpenAI checks the key first).
    const unknown = await app.request(post("/v1/chat/completions", `sk-${"Z".repeat(48)}`, "{nope", { origin: PAGE }));
    expect(unknown.status).toBe(401);
    expectReadableFrom(unknown, PAGE);
    const streamed = await app.request(
      post("/v1/chat/completions", (await newKey()).key, chat({ stream: true }), { origin: PAGE }),
    );
    expectReadableFrom(streamed, PAGE);
    await streamed.text();
  });
});
