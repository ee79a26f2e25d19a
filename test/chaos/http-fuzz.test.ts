/**
 * The HTTP API under fast-check: at least 5,000 generated requests per run, in batches of 25 sent at once. Bodies
 * mix valid fields with wrong types, out-of-range and non-finite numbers, huge and unicode strings, deep nesting,
 * unknown fields, broken JSON and invalid UTF-8; they go out with assorted content types, with a Content-Length or
 * chunked, some over the size limit. Whatever comes in: no 5xx, every 4xx in OpenAI's error shape, every 200 a
 * well-formed completion (or a stream that ends with [DONE]), and a normal request succeeds after each batch.
 *
 * Unknown fields may be accepted or refused (a 400), never a 5xx.
 */
import fc from "fast-check";
import { expect, inject, it } from "vitest";
import { secrets } from "../helpers/local-stack.ts";
import { chatOnce, client } from "../helpers/openai-streams.ts";
import { type RawResponse, sendRaw } from "../helpers/raw-http.ts";

const stack = inject("stack");
const { key } = secrets(stack);
const MODEL = "stories15m-random";
const BATCH = 25;
const RUNS = 200;
/** The gateway's default max_body_bytes. */
const MAX_BODY = 1024 * 1024;

// ---------------------------------------------------------------------------------------------------------------
// What a field may hold: mostly something valid, sometimes anything at all

const weirdNumber = fc.constantFrom(0, -1, 1.5, -0.5, 1e308, -1e308, 5e-324, 2 ** 53 + 2, 2 ** 63, 1e-320, 300, 2.0001);
const weird: fc.Arbitrary<unknown> = fc.oneof(
  fc.constant(null),
  fc.boolean(),
  fc.integer(),
  fc.double(),
  weirdNumber,
  fc.string({ maxLength: 20 }),
  fc.string({ unit: "binary", maxLength: 20 }),
  fc.jsonValue({ maxDepth: 4 }),
  // deep nesting
  fc.integer({ min: 50, max: 2000 }).map((d) => JSON.parse(`${"[".repeat(d)}${"]".repeat(d)}`)),
);
const text = fc.oneof(
  fc.string({ maxLength: 60 }),
  fc.string({ unit: "grapheme", maxLength: 40 }),
  fc.string({ unit: "binary", maxLength: 40 }),
  fc.constantFrom("", "Once upon a time", "\u0000\uFFFF\uD800", "<|im_start|>system", "{{ raise_exception('x') }}"),
);
/** Token ids the model has (its vocabulary is 32,000), and some it has not: both pass the gateway's schema. */
const tokenId = fc.oneof(
  { weight: 12, arbitrary: fc.integer({ min: 0, max: 31_999 }) },
  { weight: 1, arbitrary: fc.constantFrom(32_000, 99_999, 2 ** 31, 2 ** 53 - 1) },
);
/** A conversation the chat template accepts: an optional system turn, then user/assistant turns ending with a user. */
const conversation = fc
  .tuple(
    fc.option(fc.tuple(fc.constantFrom("system", "developer"), text), { nil: undefined }),
    fc.array(fc.tuple(text, text), { maxLength: 2 }),
    text,
    fc.boolean(),
  )
  .map(([system, turns, last, parts]) => {
    const content = (t: string) => (parts ? [{ type: "text", text: t }] : t);
    return [
      ...(system ? [{ role: system[0], content: content(system[1]) }] : []),
      ...turns.flatMap(([u, a]) => [
        { role: "user", content: content(u) },
        { role: "assistant", content: content(a) },
      ]),
      { role: "user", content: content(last) },
    ];
  });
const stop = fc.oneof(text, fc.array(text, { maxLength: 5 }));
/** Either logprobs alone, or logprobs: true with top_logprobs (OpenAI refuses top_logprobs alone), or neither. */
const chatLogprobs = fc.oneof(
  fc.constant({}),
  fc.record({ logprobs: fc.boolean() }),
  fc.record({ logprobs: fc.constant(true), top_logprobs: fc.integer({ min: 0, max: 20 }) }),
);

/** Valid values of the fields both endpoints take. Small max_tokens and n keep valid requests cheap. */
const commonFields: Record<string, fc.Arbitrary<unknown>> = {
  model: fc.constant(MODEL),
  // Absent now and then: chat then generates up to the context, completions 16 tokens.
  max_tokens: fc.option(fc.integer({ min: 1, max: 4 }), { nil: undefined, freq: 20 }),
  n: fc.integer({ min: 1, max: 3 }),
  temperature: fc.double({ min: 0, max: 2, noNaN: true }),
  top_p: fc.double({ min: 0.01, max: 1, noNaN: true }),
  top_k: fc.integer({ min: -1, max: 100 }),
  min_p: fc.double({ min: 0, max: 1, noNaN: true }),
  presence_penalty: fc.double({ min: -2, max: 2, noNaN: true }),
  frequency_penalty: fc.double({ min: -2, max: 2, noNaN: true }),
  repetition_penalty: fc.double({ min: 0.5, max: 2, noNaN: true }),
  seed: fc.integer(),
  stop,
  stop_token_ids: fc.array(tokenId, { maxLength: 4 }),
  logit_bias: fc.dictionary(tokenId.map(String), fc.double({ min: -100, max: 100, noNaN: true }), { maxKeys: 4 }),
  ignore_eos: fc.boolean(),
  stream: fc.boolean(),
  stream_options: fc.record({ include_usage: fc.boolean() }),
  user: text,
};
const chatFields = {
  ...commonFields,
  messages: conversation,
  max_completion_tokens: fc.integer({ min: 1, max: 4 }),
};
const completionFields = {
  ...commonFields,
  prompt: fc.oneof(
    { weight: 3, arbitrary: text },
    { weight: 1, arbitrary: fc.array(text, { minLength: 1, maxLength: 3 }) },
    { weight: 1, arbitrary: fc.array(tokenId, { minLength: 1, maxLength: 20 }) },
    {
      weight: 1,
      arbitrary: fc.array(fc.array(tokenId, { minLength: 1, maxLength: 5 }), { minLength: 1, maxLength: 3 }),
    },
  ),
  logprobs: fc.integer({ min: 0, max: 5 }),
  echo: fc.boolean(),
};
/** Typed right but refused or special-cased by the gateway: only ever the one odd field of a body. */
const oddFields: Record<string, fc.Arbitrary<unknown>> = {
  suffix: text,
  best_of: fc.integer({ min: 1, max: 3 }),
  top_logprobs: fc.integer({ min: 0, max: 20 }),
  messages: fc.array(
    fc.record({ role: fc.constantFrom("tool", "function", "", "USER", "user"), content: fc.oneof(text, weird) }),
    { maxLength: 3 },
  ),
};

/**
 * Bodies for one endpoint: valid ones (optional fields come and go), valid ones with one field replaced by
 * something odd or weird (each field's validation, one at a time), and bodies where any field may be weird.
 */
function bodies(
  fields: Record<string, fc.Arbitrary<unknown>>,
  required: string[],
  extra: fc.Arbitrary<object> = fc.constant({}),
): fc.Arbitrary<unknown> {
  const names = Object.keys(fields);
  const valid = fc.tuple(fc.record(fields, { requiredKeys: required }), extra).map(([b, e]) => ({ ...b, ...e }));
  const oneBad = fc
    .tuple(valid, fc.constantFrom(...names, ...Object.keys(oddFields)), fc.boolean(), weird)
    .chain(([body, name, odd, value]) =>
      (odd && oddFields[name] ? oddFields[name] : fc.constant(value)).map((v) => ({ ...body, [name]: v })),
    );
  const anyField = fc.record(
    Object.fromEntries(
      names.map((n) => [n, fc.oneof({ weight: 3, arbitrary: fields[n]! }, { weight: 1, arbitrary: weird })]),
    ),
    { requiredKeys: [] },
  );
  return fc.oneof(
    { weight: 5, arbitrary: valid },
    { weight: 4, arbitrary: oneBad },
    { weight: 1, arbitrary: anyField },
  );
}
const chatBody = bodies(chatFields, ["model", "messages", "max_tokens"], chatLogprobs);
const completionBody = bodies(completionFields, ["model", "prompt", "max_tokens"]);

/** JSON text, sometimes damaged: non-finite numbers, truncation, garbage, a BOM, invalid UTF-8, padding past the limit. */
const damage = fc.constantFrom(
  "none",
  "none",
  "none",
  "none",
  "none",
  "none",
  "none",
  "none",
  "none",
  "none",
  "infinity",
  "truncate",
  "trailing",
  "bom",
  "badUtf8",
  "oversize",
  "empty",
  "unknownField",
);
type Damage = typeof damage extends fc.Arbitrary<infer D> ? D : never;

function serialize(body: unknown, how: Damage, extra: unknown): Buffer {
  const json = JSON.stringify(body) ?? "null";
  switch (how) {
    case "infinity":
      return Buffer.from(json.replace(/(:)(-?\d+(\.\d+)?)/, "$11e999"));
    case "truncate":
      return Buffer.from(json.slice(0, Math.floor(json.length / 2)));
    case "trailing":
      return Buffer.from(`${json}}{garbage`);
    case "bom":
      return Buffer.from(`\uFEFF${json}`);
    case "badUtf8":
      return Buffer.concat([
        Buffer.from(json.slice(0, -1)),
        Buffer.from([0xff, 0xfe, 0xc3]),
        Buffer.from(json.slice(-1)),
      ]);
    case "oversize":
      return Buffer.from(`${json.slice(0, -1)}${json.length > 2 ? "," : ""}"pad":"${"x".repeat(MAX_BODY)}"}`);
    case "empty":
      return Buffer.alloc(0);
    case "unknownField":
      return Buffer.from(JSON.stringify({ ...(body as object), x_unknown_field: extra }));
    default:
      return Buffer.from(json);
  }
}

interface FuzzRequest {
  path: string;
  method: string;
  contentType: string | undefined;
  body: Buffer;
  /** Chunked (no Content-Length), split into this many pieces; 0 = with a Content-Length. */
  chunks: number;
}

const fuzzRequest: fc.Arbitrary<FuzzRequest> = fc
  .record({
    kind: fc.oneof(
      { weight: 5, arbitrary: fc.constantFrom("chat", "completions") },
      { weight: 1, arbitrary: fc.constant("other") },
    ),
    chat: chatBody,
    completion: completionBody,
    anyJson: fc.jsonValue({ maxDepth: 5 }),
    damage,
    extra: weird,
    contentType: fc.oneof(
      { weight: 10, arbitrary: fc.constant("application/json") },
      {
        weight: 3,
        arbitrary: fc.constantFrom(
          undefined,
          "text/plain",
          "application/json; charset=utf-16",
          "multipart/form-data; boundary=x",
          "application/x-www-form-urlencoded",
          "\u00e9/\u00e8",
        ),
      },
    ),
    chunks: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 6 })),
    method: fc.oneof(
      { weight: 15, arbitrary: fc.constant("POST") },
      { weight: 1, arbitrary: fc.constantFrom("PUT", "PATCH", "DELETE") },
    ),
  })
  .map((r) => {
    const path =
      r.kind === "chat"
        ? "/v1/chat/completions"
        : r.kind === "completions"
          ? "/v1/completions"
          : "/v1/chat/completions";
    const body = r.kind === "chat" ? r.chat : r.kind === "completions" ? r.completion : r.anyJson;
    return {
      path,
      method: r.method,
      contentType: r.contentType,
      body: serialize(body, r.damage, r.extra),
      chunks: r.chunks,
    };
  });

// ---------------------------------------------------------------------------------------------------------------
// Sending and judging

function send(r: FuzzRequest): Promise<RawResponse> {
  return sendRaw(`${stack.url}${r.path}`, {
    method: r.method,
    headers: { authorization: `Bearer ${key}`, ...(r.contentType ? { "content-type": r.contentType } : {}) },
    body: r.body,
    chunks: r.chunks,
  });
}

/** OpenAI's error body: {"error": {"message", "type", "param", "code"}}, param and code a string or null. */
function isOpenAIError(body: unknown): boolean {
  const e = (body as { error?: Record<string, unknown> } | null)?.error;
  const stringOrNull = (v: unknown) => v === null || typeof v === "string";
  return (
    typeof e === "object" &&
    e !== null &&
    typeof e.message === "string" &&
    typeof e.type === "string" &&
    stringOrNull(e.param) &&
    stringOrNull(e.code)
  );
}

const describe = (r: FuzzRequest) =>
  `${r.method} ${r.path} ${r.contentType ?? "(no content-type)"} ${r.chunks ? `chunked (${r.chunks})` : "length"} ` +
  `${r.body.length} bytes: ${r.body.subarray(0, 600).toString()}`;

/** Throws (with the request) unless the response is a well-formed success or an OpenAI-shaped 4xx. */
function judge(r: FuzzRequest, res: RawResponse): void {
  const where = describe(r);
  expect(res.status, where).toBeLessThan(500);
  if (res.status >= 400) {
    expect(res.contentType, where).toContain("application/json");
    expect(isOpenAIError(JSON.parse(res.text)), `${where}\n${res.text}`).toBe(true);
    return;
  }
  expect(res.status, where).toBe(200);
  if (res.contentType.includes("text/event-stream")) {
    const data = res.text
      .split("\n")
      .filter((l) => l.startsWith("data: "))
      .map((l) => l.slice(6));
    expect(data.at(-1), `${where}\n${res.text.slice(-500)}`).toBe("[DONE]");
    for (const d of data.slice(0, -1)) expect(JSON.parse(d), where).not.toHaveProperty("error");
  } else {
    const body = JSON.parse(res.text);
    expect(["chat.completion", "text_completion"], where).toContain(body.object);
    expect(body.choices.length, where).toBeGreaterThan(0);
  }
}

it(`answers ${RUNS * BATCH} fuzzed requests without a 5xx, every error in OpenAI's shape`, async () => {
  const openai = client(stack.url, key);
  let sent = 0;
  const statuses = new Map<number, number>();
  await fc.assert(
    fc.asyncProperty(fc.array(fuzzRequest, { minLength: BATCH, maxLength: BATCH }), async (batch) => {
      const results = await Promise.all(
        batch.map((r) => send(r).catch((e: Error) => Promise.reject(new Error(`${describe(r)}: ${e.message}`)))),
      );
      batch.forEach((r, i) => {
        sent++;
        statuses.set(results[i]!.status, (statuses.get(results[i]!.status) ?? 0) + 1);
        judge(r, results[i]!);
      });
      const normal = await chatOnce(openai, { model: MODEL, max_tokens: 2 });
      expect(normal.error, "a normal request after the batch").toBeUndefined();
    }),
    // No shrinking: each failure names its request already, and shrinking over HTTP takes long.
    { numRuns: RUNS, endOnFailure: true },
  );
  console.log(`http fuzz: ${sent} requests, statuses ${JSON.stringify(Object.fromEntries([...statuses].sort()))}`);
  expect(sent).toBeGreaterThanOrEqual(5000);
}, 1_800_000);
