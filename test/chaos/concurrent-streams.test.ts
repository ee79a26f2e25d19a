/**
 * 500 streams at once on the small default model: every one completes (bounded: 16 tokens each, and the run stops
 * by itself), and the key's ledger equals, to the token, the sum of the usage the streams reported.
 */
import OpenAI from "openai";
import { Agent, fetch, type RequestInit } from "undici";
import { expect, inject, it } from "vitest";
import { admin } from "../../edge/dev/gateway.mjs";
import { secrets } from "../helpers/local-stack.ts";
import { watchStream } from "../helpers/openai-streams.ts";

const stack = inject("stack");
const gw = { url: stack.url, port: 0, adminSecret: secrets(stack).adminSecret, stop: async () => {} };
const STREAMS = 500;
const MAX_TOKENS = 16;

it(`completes ${STREAMS} concurrent streams with the ledger equal to the reported usage`, async () => {
  const { key, id } = (await admin(gw, "POST", "/keys", { name: "chaos-500" })) as { key: string; id: string };
  // Its own connection pool: sockets other scenarios left idle could be closed by the server just as one is
  // reused (a client-side race that a real client's retry covers; this one does not retry).
  const agent = new Agent();
  const openai = new OpenAI({
    apiKey: key,
    baseURL: `${stack.url}/v1`,
    maxRetries: 0,
    timeout: 300_000,
    fetch: (url, init) =>
      fetch(url as string, { ...(init as RequestInit), dispatcher: agent }) as unknown as Promise<Response>,
  });
  const startedAt = Date.now();
  const outcomes = await Promise.all(
    Array.from({ length: STREAMS }, (_, i) =>
      watchStream(openai, {
        model: "stories15m-random",
        // Prompts differ, so that the prefix cache serves only what they truly share.
        messages: [{ role: "user", content: `Stream ${i}: tell me about ${i % 7} cats` }],
        max_tokens: MAX_TOKENS,
        ignore_eos: true,
      }).then((s) => s.outcome),
    ),
  );
  const seconds = (Date.now() - startedAt) / 1000;
  const sum = { requests: 0, prompt_tokens: 0, completion_tokens: 0, cached_tokens: 0 };
  for (const o of outcomes) {
    expect(o.error).toBeUndefined();
    expect(o.finishReason).toBe("length");
    expect(o.usage?.completion_tokens).toBe(MAX_TOKENS);
    sum.requests++;
    sum.prompt_tokens += o.usage!.prompt_tokens;
    sum.completion_tokens += o.usage!.completion_tokens;
    sum.cached_tokens += o.usage!.prompt_tokens_details?.cached_tokens ?? 0;
  }
  const usage = (await admin(gw, "GET", `/keys/${id}/usage`)) as { totals: typeof sum };
  expect(usage.totals).toEqual(sum);
  await agent.close();
  console.log(
    `concurrent streams: ${STREAMS} completed in ${seconds.toFixed(1)} s, ` +
      `${sum.completion_tokens} tokens, ${sum.cached_tokens} of ${sum.prompt_tokens} prompt tokens cached`,
  );
}, 600_000);
