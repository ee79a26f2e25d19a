/**
 * `npm run bench:engine -- --only structured`: constrained decoding (response_format json_schema) against free
 * decoding, and what compiling a schema costs.
 *
 * @module
 */
import type { GrammarSpec } from "../src/engine/grammar.ts";
import { LLMEngine } from "../src/engine/llm-engine.ts";
import { ensureDefaultModel } from "../src/model/default-model.ts";
import { backend, decodeThroughput, log, quick, record } from "./harness.ts";

/** A typical structured-output schema: a record with bounded strings, numbers, an enum and a list. */
const PERSON_SCHEMA = {
  type: "object",
  properties: {
    name: { type: "string", pattern: "^[A-Z][a-z]{1,15}$" },
    age: { type: "integer", minimum: 0, maximum: 130 },
    email: { type: "string", format: "email" },
    score: { type: "number", minimum: 0, maximum: 1 },
    role: { enum: ["admin", "editor", "viewer"] },
    tags: { type: "array", items: { type: "string", maxLength: 12 }, maxItems: 5 },
  },
  required: ["name", "age", "role"],
};

/**
 * Constrained decoding (response_format json_schema) against free decoding: 32 greedy streams on the default model,
 * best of alternating rounds.
 * The schema is a list of records that cannot close within the token budget, so every stream decodes the same
 * number of tokens under the grammar (integers, enums, bounded strings and JSON structure, in turn). Also the
 * time to compile a typical schema: XGrammar's start (once per process and tokenizer), a schema never seen
 * (cold) and the same schema again (cached).
 */
export async function structuredOutput() {
  const dir = await ensureDefaultModel("default", { quiet: true });
  const engine = await LLMEngine.create({ ...backend, modelDir: dir, maxNumSeqs: 32 });
  let t = performance.now();
  await engine.grammars.warmUp();
  const initMs = performance.now() - t;
  // A description no run used before: a real compilation, not a cache hit.
  const typical: GrammarSpec = { type: "json_schema", schema: { ...PERSON_SCHEMA, description: `run ${Date.now()}` } };
  t = performance.now();
  await engine.grammars.compile(typical);
  const coldMs = performance.now() - t;
  t = performance.now();
  await engine.grammars.compile(typical);
  const cachedMs = performance.now() - t;
  const stream: GrammarSpec = {
    type: "json_schema",
    schema: {
      type: "object",
      properties: { people: { type: "array", items: PERSON_SCHEMA, minItems: 100 } },
      required: ["people"],
    },
  };
  await engine.grammars.compile(stream);
  const tokens = quick ? 24 : 64;
  await decodeThroughput(engine, 4, 4, {}, stream); // warm-up
  // Alternating rounds, best of each: load from elsewhere on the machine hits both alike.
  let free = 0;
  let constrained = 0;
  for (let round = 0; round < (quick ? 2 : 3); round++) {
    free = Math.max(free, await decodeThroughput(engine, 32, tokens));
    constrained = Math.max(constrained, await decodeThroughput(engine, 32, tokens, {}, stream));
  }
  log(`\n## Structured output (default model, 32 greedy streams, ${tokens} tokens each)`);
  log("| decoding | tokens/s | vs unconstrained |\n|---|---:|---:|");
  log(`| unconstrained | ${free.toFixed(1)} | 1.00 |`);
  log(`| json_schema | ${constrained.toFixed(1)} | ${(constrained / free).toFixed(2)} (target ≥ 0.9) |`);
  log(
    `schema compile: XGrammar start ${initMs.toFixed(0)} ms (once per tokenizer), typical schema cold ${coldMs.toFixed(0)} ms, cached ${cachedMs.toFixed(3)} ms`,
  );
  record("structured_tps_32", constrained, 1);
  record("unconstrained_tps_32", free, 1);
  record("structured_ratio_32", constrained / free);
  record("grammar_init_ms", initMs, 0);
  record("schema_compile_ms_cold", coldMs, 1);
  record("schema_compile_ms_cached", cachedMs, 3);
}
