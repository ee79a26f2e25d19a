/**
 * The web console in a real browser (Debian's chromium through playwright-core) against the real stack, as
 * `npm start` runs it: the gateway under `wrangler dev` serving console/dist as static assets, nats-server, and a
 * `llama-worker serve` on the generated default model. Screenshots of each page land in .cache/console/.
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import OpenAI from "openai";
import type { Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { admin, ensureDevKey, type Gateway } from "../edge/dev/gateway.mjs";
import { launchBrowser, type TestBrowser } from "./helpers/browser.ts";
import { startStack, type TestStack } from "./helpers/stack.ts";
import type { WorkerProcess } from "./helpers/worker-process.ts";

const MODEL = "stories15m-random";
const SHOTS = join(import.meta.dirname, "..", ".cache", "console");
/** Replies take seconds on a loaded two-core machine: wait for what the page shows for up to this long. */
const EVENTUALLY = { timeout: 30_000, interval: 50 };

let stack: TestStack;
let worker: WorkerProcess;
let gw: Gateway;
let browser: TestBrowser;
/** Every request the console's pages sent: where, and with which Authorization header. */
const sent: { url: string; authorization: string | undefined }[] = [];
/** Credentials the console was given: none may show up in a URL. */
const secrets: string[] = [];

beforeAll(async () => {
  mkdirSync(SHOTS, { recursive: true });
  [stack, browser] = await Promise.all([
    startStack({ workerId: "console-w1", config: { pools: { default: { max_context: 256, models: [MODEL] } } } }),
    launchBrowser(),
  ]);
  ({ worker, gw } = stack);
  secrets.push(gw.adminSecret);
  await browser.context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: gw.url });
}, 180_000);

afterAll(async () => {
  await browser?.close();
  await stack?.stop();
});

async function newKey(limits: Record<string, unknown> = {}): Promise<{ key: string; id: string }> {
  const created = await admin(gw, "POST", "/keys", { name: "console-test", limits });
  secrets.push(created.key as string);
  return { key: created.key as string, id: created.id as string };
}

const client = (apiKey: string) => new OpenAI({ apiKey, baseURL: `${gw.url}/v1`, maxRetries: 0, timeout: 60_000 });

/** A new tab (its own sessionStorage) on a console page, its requests recorded. */
async function open(path: string): Promise<Page> {
  const page = await browser.context.newPage();
  page.on("request", (r) => sent.push({ url: r.url(), authorization: r.headers()["authorization"] }));
  await page.goto(`${gw.url}${path}`);
  return page;
}

/** Pastes the key into the playground and waits for the model picker to offer the model. */
async function useKey(page: Page, key: string) {
  await page.getByLabel("API key", { exact: true }).fill(key);
  await expect.poll(() => page.getByLabel("Model").inputValue(), EVENTUALLY).toBe(MODEL);
}

const lastReply = (page: Page) => page.locator("article.assistant").last();

async function send(page: Page, message: string) {
  await page.getByLabel("Message", { exact: true }).fill(message);
  await page.getByRole("button", { name: "Send" }).click();
}

const shot = (page: Page, name: string) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });

describe("playground", () => {
  it("streams a reply from the dev key, arriving in pieces, with TTFT and tokens/s", async () => {
    const key = await ensureDevKey(gw, join(stack.stateDir, "dev-key"));
    secrets.push(key);
    const page = await open("/");
    await useKey(page, key);
    await page.getByLabel("max_tokens").fill("48");
    await page.getByLabel("Temperature").fill("0");
    // Every text the reply showed while it was still streaming.
    await page.evaluate(() => {
      const w = window as unknown as { seen: string[] };
      w.seen = [];
      new MutationObserver(() => {
        const reply = [...document.querySelectorAll("article.assistant")].at(-1);
        const text = reply?.querySelector(".content")?.textContent ?? "";
        if (reply?.getAttribute("data-status") === "streaming" && text && text !== w.seen.at(-1)) w.seen.push(text);
      }).observe(document.body, { subtree: true, childList: true, characterData: true });
    });
    await send(page, "Once upon a time");
    await expect.poll(() => lastReply(page).getAttribute("data-status"), EVENTUALLY).toBe("done");
    const final = await lastReply(page).locator(".content").textContent();
    const seen = await page.evaluate(() => (window as unknown as { seen: string[] }).seen);
    expect(seen.length).toBeGreaterThanOrEqual(2);
    for (const partial of seen) expect(final?.startsWith(partial)).toBe(true);
    expect(seen.at(-1)!.length).toBeLessThanOrEqual(final!.length);
    await expect
      .poll(() => lastReply(page).locator(".stats").textContent())
      .toMatch(/^TTFT \d+ ms · [\d.]+ tokens\/s · 48 tokens · finish: length$/);
    await page.screenshot({ path: join(SHOTS, "playground.png") });
    // The same request as code: the key is not in it.
    await page.getByText("Code for this request").click();
    const curl = await page.locator("pre code").first().textContent();
    expect(curl).toContain(`${gw.url}/v1/chat/completions`);
    expect(curl).toContain('"max_tokens": 48');
    expect(curl).not.toContain(key);
    await shot(page, "playground-code");
    // The key stays in this tab's sessionStorage only.
    expect(await page.evaluate(() => JSON.stringify(localStorage))).not.toContain(key);
    expect(await page.evaluate(() => document.cookie)).toBe("");
    await page.close();
  });

  it("Stop ends the stream, and the worker aborts the request", async () => {
    const { key } = await newKey();
    // Background streams (another key) keep the engine busy, so the reply cannot finish its 200 tokens before
    // Stop: the tiny model alone makes them in well under a second.
    const busy = client((await newKey()).key);
    const stopBackground = new AbortController();
    const background = Array.from({ length: 12 }, () =>
      busy.completions.create(
        {
          model: MODEL,
          prompt: "Once",
          max_tokens: 200,
          ignore_eos: true,
        } as OpenAI.CompletionCreateParamsNonStreaming,
        { signal: stopBackground.signal },
      ),
    );
    const page = await open("/");
    await useKey(page, key);
    await page.getByLabel("max_tokens").fill("200");
    await page.getByLabel("Temperature").fill("0");
    const response = page.waitForResponse((r) => r.url().endsWith("/v1/chat/completions"));
    await send(page, "Tell me everything");
    const requestId = (await response).headers()["x-request-id"]!;
    await expect.poll(() => lastReply(page).locator(".content").textContent(), EVENTUALLY).not.toBe("");
    await page.getByRole("button", { name: "Stop" }).click();
    await expect.poll(() => lastReply(page).getAttribute("data-status"), EVENTUALLY).toBe("stopped");
    await expect(page.getByRole("button", { name: "Send" }).isEnabled()).resolves.toBe(true);
    const finished = await worker.waitForLog(
      (l) => l.msg === "finished" && String(l.request_id).startsWith(requestId) && l.finish_reason === "abort",
      15_000,
    );
    expect((finished.usage as { completion_tokens: number }).completion_tokens).toBeLessThan(200);
    // The background requests have done their part: cancelled too, so the next tests get an idle worker.
    stopBackground.abort();
    await Promise.allSettled(background);
    await page.close();
  });

  it("shows a 429 from a key with rpm 1 as a readable message", async () => {
    const { key } = await newKey({ rpm: 1 });
    const page = await open("/");
    await useKey(page, key);
    await page.getByLabel("max_tokens").fill("4");
    await send(page, "One");
    await expect.poll(() => lastReply(page).getAttribute("data-status"), EVENTUALLY).toBe("done");
    // From the keyboard this time: Enter in the message box sends.
    await page.getByLabel("Message", { exact: true }).fill("Two");
    await page.getByLabel("Message", { exact: true }).press("Enter");
    const alert = page.getByRole("alert");
    await expect.poll(() => alert.textContent(), EVENTUALLY).toMatch(/^429 rate_limit_exceeded: .+ Retry in \d+ s\.$/);
    expect(await lastReply(page).getAttribute("data-status")).toBe("failed");
    // The usage page lists it among this tab's 429s.
    await page.getByRole("link", { name: "Usage" }).click();
    await expect
      .poll(() => page.getByRole("region", { name: "Recent 429s in this tab" }).textContent())
      .toContain("rate_limit_exceeded");
    await page.close();
  });
});

describe("usage", () => {
  it("shows the numbers the API reports for the key after two requests", async () => {
    const { key } = await newKey({ rpm: 10 });
    const page = await open("/");
    await useKey(page, key);
    await page.getByLabel("max_tokens").fill("6");
    for (const message of ["First", "Second"]) {
      await send(page, message);
      await expect.poll(() => lastReply(page).getAttribute("data-status"), EVENTUALLY).toBe("done");
    }
    // The ledger is settled when the workers' final events reach the gateway, a moment after the client has
    // its reply: wait until the API counts both, then open the page.
    const usage = async () => {
      const res = await fetch(`${gw.url}/v1/usage`, { headers: { authorization: `Bearer ${key}` } });
      return { res, report: (await res.json()) as { totals: Record<string, number> } };
    };
    await expect.poll(async () => (await usage()).report.totals.requests, EVENTUALLY).toBe(2);
    const { res, report } = await usage();
    await page.getByRole("link", { name: "Usage" }).click();
    expect(new URL(page.url()).pathname).toBe("/usage");
    const shown = async (label: string) => {
      const term = page.locator("dt", { hasText: new RegExp(`^${label}$`) });
      return (await page.locator("dl.totals div", { has: term }).locator("dd").textContent())?.replaceAll(",", "");
    };
    await expect.poll(() => shown("Requests"), EVENTUALLY).toBe("2");
    expect(await shown("Prompt tokens")).toBe(String(report.totals.prompt_tokens));
    expect(await shown("Completion tokens")).toBe(String(report.totals.completion_tokens));
    expect(await shown("Cached prompt tokens")).toBe(String(report.totals.cached_tokens));
    // What remains now, from the same rate-limit headers the API sends.
    expect(res.headers.get("x-ratelimit-remaining-requests")).toBe("8");
    expect(await page.getByTestId("remaining-requests").textContent()).toMatch(/^8 of 10 per minute/);
    expect(await page.getByText("10 requests/min").count()).toBe(1);
    // Charts and the table with the same numbers.
    expect(await page.locator("figure.chart canvas").count()).toBe(2);
    const row = page.getByRole("row", { name: new RegExp(MODEL) });
    await expect(row.getByRole("cell").nth(2).textContent()).resolves.toBe("2");
    await shot(page, "usage");
    await page.close();
  });
});

describe("admin", () => {
  it("creates a key shown once, sees its usage, edits its limits and revokes it", async () => {
    const page = await open("/keys");
    await page.getByLabel("Admin secret").fill(gw.adminSecret);
    await page.getByRole("group", { name: "Create a key" }).getByLabel("Name").fill("from-the-browser");
    await page.getByRole("button", { name: "Create key" }).click();
    const shown = page.getByLabel("New API key");
    await expect.poll(() => shown.inputValue(), EVENTUALLY).toMatch(/^sk-le-[A-Za-z0-9]{48}$/);
    const key = await shown.inputValue();
    secrets.push(key);
    await page.getByRole("button", { name: "Copy key" }).click();
    expect(await page.evaluate(() => navigator.clipboard.readText())).toBe(key);
    await page.getByRole("button", { name: "Done" }).click();
    expect(await page.getByLabel("New API key").count()).toBe(0);

    // The new key works with the openai client, and its usage shows in the list.
    const done = await client(key).chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "Hi" }],
      max_tokens: 5,
    });
    const tokens = done.usage!.prompt_tokens + done.usage!.completion_tokens;
    const row = page.getByRole("row", { name: /from-the-browser/ });
    const id = (await row.getAttribute("data-key-id"))!;
    // Settled a moment after the reply (see the usage test): wait for the API to count it, then refresh.
    await expect
      .poll(async () => ((await admin(gw, "GET", `/keys/${id}/usage`)) as { totals: { requests: number } }).totals)
      .toMatchObject({ requests: 1 });
    await page.getByRole("button", { name: "Refresh" }).click();
    await expect.poll(() => row.textContent(), EVENTUALLY).toContain(`${tokens} tokens, 1 requests`);
    expect(await row.getByRole("img", { name: /Tokens per day/ }).count()).toBe(1);
    await shot(page, "admin");

    // Edit its limits: the admin API has them.
    await row.getByRole("button", { name: /^Edit/ }).click();
    await row.getByLabel("Requests per minute").fill("5");
    await row.getByRole("button", { name: "Save" }).click();
    await expect.poll(() => row.textContent(), EVENTUALLY).toContain("5 requests/min");
    const info = (await admin(gw, "GET", `/keys/${id}`)) as { limits: { rpm: number } };
    expect(info.limits.rpm).toBe(5);

    // Revoke: the next request with it is a 401, for the openai client and in the playground.
    page.once("dialog", (d) => d.accept());
    await row.getByRole("button", { name: /^Revoke/ }).click();
    await expect.poll(() => row.textContent(), EVENTUALLY).toContain("revoked");
    await expect(client(key).models.list()).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
    const playground = await open("/");
    await playground.getByLabel("API key", { exact: true }).fill(key);
    await expect.poll(() => playground.getByRole("alert").textContent(), EVENTUALLY).toMatch(/^401 invalid_api_key: /);
    await playground.close();
    await page.close();
  });

  it("shows a wrong admin secret as a 401", async () => {
    const page = await open("/keys");
    await page.getByLabel("Admin secret").fill("not-the-secret");
    await expect.poll(() => page.getByRole("alert").textContent(), EVENTUALLY).toMatch(/^401 .*admin/i);
    await page.close();
  });
});

describe("credentials", () => {
  it("sends the admin secret only to /admin, API keys only to /v1, and neither in a URL", () => {
    expect(sent.length).toBeGreaterThan(10);
    for (const r of sent) {
      const path = new URL(r.url).pathname;
      for (const s of secrets) expect(r.url, "a credential in a URL").not.toContain(s);
      if (r.authorization === `Bearer ${gw.adminSecret}`) expect(path, r.url).toMatch(/^\/admin\//);
      else if (r.authorization !== undefined && r.authorization !== "Bearer not-the-secret")
        expect(path, r.url).toMatch(/^\/v1\//);
    }
  });
});
