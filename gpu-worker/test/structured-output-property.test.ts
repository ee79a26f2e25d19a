/**
 * Property: whatever the schema and the seed, a constrained output that completes parses and validates against its
 * schema. Random schemas (fast-check: objects, arrays, enums, const, anyOf, nesting, required and optional
 * properties, bounded integers and numbers, strings with patterns or lengths) are sampled at temperature 1 on the
 * default model (Llama 2's byte-fallback vocabulary) and on a GQA model with Llama 3's byte-level vocabulary, and
 * every completed output is checked with ajv.
 *
 * Random weights never stop on their own inside a free string, so strings here always carry a bound (pattern, enum,
 * maxLength): the point is validity, and outputs cut by max_tokens are counted, not judged. `FC_SEED` replays a run;
 * `SCHEMA_RUNS` changes how many schemas each model gets.
 */
import { Ajv } from "ajv";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { LLMEngine } from "../src/engine/llm-engine.ts";
import { ensureDefaultModel } from "../src/model/default-model.ts";
import { ensureToolModel } from "./tool-model.ts";

type Schema = Record<string, unknown>;

const PATTERNS = ["^[a-z]{1,6}$", "^[A-Z][a-z]{0,5}$", "^[0-9]{2,4}$", "^(yes|no|maybe)$", "^[a-f0-9]{4}$", "^x+$"];
const word = fc.stringMatching(/^[a-z]{1,5}$/);

const leaf: fc.Arbitrary<Schema> = fc.oneof(
  fc.constant({ type: "boolean" }),
  fc.constant({ type: "null" }),
  fc
    .tuple(fc.integer({ min: -1000, max: 1000 }), fc.integer({ min: 0, max: 2000 }))
    .map(([min, span]) => ({ type: "integer", minimum: min, maximum: min + span })),
  fc
    .tuple(fc.integer({ min: -50, max: 50 }), fc.integer({ min: 1, max: 100 }))
    .map(([min, span]) => ({ type: "number", minimum: min, maximum: min + span })),
  fc.uniqueArray(word, { minLength: 1, maxLength: 4 }).map((values) => ({ enum: values })),
  fc.oneof(word, fc.integer({ min: -9, max: 9 }), fc.boolean()).map((value) => ({ const: value })),
  fc.constantFrom(...PATTERNS).map((pattern) => ({ type: "string", pattern })),
  fc
    .tuple(fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 4 }))
    .map(([min, extra]) => ({ type: "string", minLength: min, maxLength: min + extra })),
);

const { schema: schemaArb } = fc.letrec<{ schema: Schema; object: Schema; array: Schema }>((tie) => ({
  schema: fc.oneof({ depthSize: "small", withCrossShrink: true }, leaf, tie("object"), tie("array")),
  object: fc
    .uniqueArray(fc.tuple(fc.stringMatching(/^[a-z][a-z_]{0,7}$/), tie("schema"), fc.boolean()), {
      minLength: 1,
      maxLength: 4,
      selector: ([name]) => name,
    })
    .map((props) => ({
      type: "object",
      properties: Object.fromEntries(props.map(([name, s]) => [name, s])),
      required: props.filter(([, , req]) => req).map(([name]) => name),
      additionalProperties: false,
    })),
  array: fc
    .tuple(tie("schema"), fc.integer({ min: 0, max: 2 }), fc.integer({ min: 0, max: 2 }))
    .map(([items, min, extra]) => ({ type: "array", items, minItems: min, maxItems: min + extra })),
}));

/** Top level: an object (what response_format schemas are), sometimes an anyOf of two. */
const topLevel = fc.oneof(
  { arbitrary: schemaArb.filter((s) => s.type === "object"), weight: 4 },
  { arbitrary: fc.tuple(leaf, schemaArb).map(([a, b]) => ({ anyOf: [a, b] })), weight: 1 },
);

const fcSeed = Number(process.env.FC_SEED ?? Math.floor(Math.random() * 2 ** 31));
const runs = Number(process.env.SCHEMA_RUNS ?? 200);

async function checkModel(modelDir: string, numSchemas: number, maxTokens: number) {
  const engine = await LLMEngine.create({ modelDir, maxNumSeqs: 32 });
  const schemas = fc.sample(topLevel, { seed: fcSeed, numRuns: numSchemas });
  const ajv = new Ajv({ strict: false });
  const jobs = schemas.flatMap((schema, i) =>
    [0, 1].map(async (k) => {
      const seed = (fcSeed + i * 2 + k) % 2 ** 31;
      let text = "";
      let finish = "";
      for await (const ev of engine.submit({
        requestId: `s${i}-${k}`,
        prompt: "Answer in JSON.",
        sampling: { temperature: 1, seed, maxTokens },
        grammar: { type: "json_schema", schema },
      })) {
        if (ev.type === "delta") text += ev.text;
        else finish = ev.finishReason;
      }
      return { schema, seed, text, finish };
    }),
  );
  const results = await Promise.all(jobs);
  const completed = results.filter((r) => r.finish === "stop");
  for (const r of completed) {
    const context = `FC_SEED=${fcSeed} seed=${r.seed} schema=${JSON.stringify(r.schema)} output=${JSON.stringify(r.text)}`;
    let value: unknown;
    expect(() => {
      value = JSON.parse(r.text);
    }, context).not.toThrow();
    const validate = ajv.compile(r.schema);
    expect(validate(value), `${context} errors=${JSON.stringify(validate.errors)}`).toBe(true);
  }
  for (const r of results) expect(r.finish, `FC_SEED=${fcSeed} ${JSON.stringify(r.schema)}`).toMatch(/^(stop|length)$/);
  // Bounded schemas mostly complete well within max_tokens: the property is not checked on a handful of outputs.
  expect(completed.length, `FC_SEED=${fcSeed}: ${completed.length} of ${results.length} completed`).toBeGreaterThan(
    results.length * 0.6,
  );
}

describe("constrained outputs validate against random schemas (property)", () => {
  it(`default model: ${runs} schemas × 2 seeds at temperature 1`, async () => {
    await checkModel(await ensureDefaultModel("default", { quiet: true }), runs, 200);
  }, 900_000);

  it(`GQA model with a byte-level vocabulary: ${Math.ceil(runs / 3)} schemas × 2 seeds`, async () => {
    await checkModel(ensureToolModel(), Math.ceil(runs / 3), 300);
  }, 900_000);
});
