import { abortAllDurableObjects, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import { DurableKeyStore } from "../src/durable/durable-key-store.ts";
import { hashApiKey } from "../src/keys/api-key.ts";
import { ADMIN_SECRET, bearer, chat, instrumented, MODEL, makeApp, newKey, post, testConfig } from "./helpers.ts";

const admin = (method: string, path: string, body?: unknown, secret = ADMIN_SECRET) =>
  new Request(`http://gateway/admin${path}`, {
    method,
    headers: { ...bearer(secret), "content-type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });

describe("admin API", () => {
  it("creates a key shown once, lists, gets, updates limits and revokes it", async () => {
    const { app } = makeApp();
    const created = await app.request(admin("POST", "/keys", { name: "ci", limits: { rpm: 10, models: [MODEL] } }));
    expect(created.status).toBe(201);
    const info = (await created.json()) as { id: string; key: string; hint: string; limits: Record<string, unknown> };
    expect(info.key).toMatch(/^sk-le-[0-9A-Za-z]{48}$/);
    expect(info.hint).toBe(`sk-...${info.key.slice(-4)}`);
    expect(info.limits).toEqual({ rpm: 10, tpm: null, max_concurrent: null, budget: null, models: [MODEL] });

    const listed = (await (await app.request(admin("GET", "/keys"))).json()) as { data: Record<string, unknown>[] };
    const mine = listed.data.find((k) => k.id === info.id)!;
    expect(mine).toMatchObject({ name: "ci", object: "api_key" });
    expect(JSON.stringify(listed)).not.toContain(info.key);

    const updated = await app.request(admin("PATCH", `/keys/${info.id}`, { limits: { rpm: null, tpm: 5000 } }));
    expect(await updated.json()).toMatchObject({ limits: { rpm: null, tpm: 5000, models: [MODEL] } });
    const got = await app.request(admin("GET", `/keys/${info.id}`));
    expect(await got.json()).toMatchObject({ id: info.id, limits: { tpm: 5000 } });

    // The key works, then is revoked.
    expect(
      (
        await app.request(
          post("/v1/chat/completions", info.key, { model: MODEL, messages: [{ role: "user", content: "x" }] }),
        )
      ).status,
    ).toBe(200);
    const revoked = await app.request(admin("DELETE", `/keys/${info.id}`));
    expect(((await revoked.json()) as { revoked_at: number | null }).revoked_at).toBeTypeOf("number");
    expect((await app.request("/v1/models", { headers: bearer(info.key) })).status).toBe(401);
  });

  it("stores only the hash of a key", async () => {
    const { app } = makeApp();
    const { key } = (await (await app.request(admin("POST", "/keys", {}))).json()) as { key: string };
    const hash = await hashApiKey(key);
    const stored = await runInDurableObject(env.KEYS.get(env.KEYS.idFromName(hash)), async (_, state) =>
      JSON.stringify([...state.storage.kv.list()]),
    );
    expect(stored).toContain("sk-...");
    expect(stored).not.toContain(key);
    const dir = await runInDurableObject(
      env.KEY_DIRECTORY.get(env.KEY_DIRECTORY.idFromName("directory")),
      async (_, state) => JSON.stringify([...state.storage.kv.list()]),
    );
    expect(dir).toContain(hash);
    expect(dir).not.toContain(key);
  });

  it("refuses a wrong or missing admin secret, and API keys", async () => {
    const { app } = makeApp();
    expect((await app.request(admin("GET", "/keys", undefined, "wrong-secret-wrong-secret"))).status).toBe(401);
    expect((await app.request("/admin/keys")).status).toBe(401);
    const { key } = (await (await app.request(admin("POST", "/keys", {}))).json()) as { key: string };
    expect((await app.request(admin("GET", "/keys", undefined, key))).status).toBe(401);
  });

  it("validates bodies and answers 404 for unknown keys", async () => {
    const { app } = makeApp();
    const bad = await app.request(admin("POST", "/keys", { limits: { rpm: "many" } }));
    expect(bad.status).toBe(400);
    expect(await bad.json()).toMatchObject({ error: { param: "limits.rpm", code: "invalid_type" } });
    // RPM sizes the key's window in memory: bounded.
    const huge = await app.request(admin("POST", "/keys", { limits: { rpm: 1_000_000 } }));
    expect(huge.status).toBe(400);
    expect(await huge.json()).toMatchObject({ error: { param: "limits.rpm", code: "invalid_value" } });
    expect((await app.request(admin("GET", "/keys/key_nope"))).status).toBe(404);
    expect((await app.request(admin("PATCH", "/keys/key_nope", { name: "x" }))).status).toBe(404);
    expect((await app.request(admin("DELETE", "/keys/key_nope"))).status).toBe(404);
  });
});

describe("key creation is atomic", () => {
  const listed = async (app: ReturnType<typeof makeApp>["app"]) =>
    ((await (await app.request(admin("GET", "/keys"))).json()) as { data: { id: string }[] }).data.map((k) => k.id);

  it.each([
    ["the key's object", "KEYS"],
    ["the directory", "KEY_DIRECTORY"],
  ])("leaves no key behind when writing %s fails", async (_, binding) => {
    const keys = instrumented(env.KEYS, binding === "KEYS" ? "create" : undefined);
    const dir = instrumented(env.KEY_DIRECTORY, binding === "KEY_DIRECTORY" ? "put" : undefined);
    const { app } = makeApp(undefined, testConfig, { keys: new DurableKeyStore(keys.ns, dir.ns) });
    const before = await listed(makeApp().app);
    const res = await app.request(admin("POST", "/keys", { name: "doomed" }));
    expect(res.status).toBe(500);
    expect(JSON.stringify(await res.json())).not.toMatch(/sk-le-/); // no key handed out
    expect(await listed(makeApp().app)).toEqual(before);
  });
});

describe("ADMIN_SECRET", () => {
  it.each([undefined, "short-secret"])(
    "missing or too short (%s) disables only the admin API, with an error logged",
    async (secret) => {
      const errorLog = vi.spyOn(console, "error").mockImplementation(() => {});
      const { app } = makeApp(undefined, testConfig, { adminSecret: secret });
      expect(errorLog.mock.calls.flat().join(" ")).toMatch(/admin API disabled: ADMIN_SECRET/);
      errorLog.mockRestore();
      const off = await app.request(admin("GET", "/keys", undefined, secret ?? "anything-at-all-1234"));
      expect(off.status).toBe(401);
      expect(await off.json()).toMatchObject({ error: { code: "admin_disabled" } });
      const { key } = await newKey();
      expect((await app.request(post("/v1/chat/completions", key, chat()))).status).toBe(200);
    },
  );
});

describe("key state storage", () => {
  it("sees admission writes at once and keeps them across a restart of the object", async () => {
    const { app } = makeApp();
    const { key } = (await (await app.request(admin("POST", "/keys", { limits: { rpm: 2, tpm: 10_000 } }))).json()) as {
      key: string;
    };
    const stub = env.KEYS.get(env.KEYS.idFromName(await hashApiKey(key)));
    const first = (await stub.admit({ model: MODEL, tokens: 100, expiresAt: Date.now() + 60_000 })) as { ok: boolean };
    expect(first.ok).toBe(true);
    const stored = await runInDurableObject(stub, async (_, state) => ({
      tpm: state.storage.kv.get<{ tokens: number }>("tpm"),
      slots: [...state.storage.kv.list({ prefix: "rpm:" })].length,
      reservations: [...state.storage.kv.list({ prefix: "res:" })].length,
    }));
    expect(stored.tpm?.tokens).toBeLessThanOrEqual(9_900);
    expect(stored.slots).toBe(1);
    expect(stored.reservations).toBe(1);
    await abortAllDurableObjects();
    const again = env.KEYS.get(env.KEYS.idFromName(await hashApiKey(key)));
    expect(
      ((await again.admit({ model: MODEL, tokens: 1, expiresAt: Date.now() + 60_000 })) as { ok: boolean }).ok,
    ).toBe(true);
    expect(
      ((await again.admit({ model: MODEL, tokens: 1, expiresAt: Date.now() + 60_000 })) as { ok: boolean }).ok,
    ).toBe(false);
    expect(await again.openReservations()).toBe(2);
  });
});
