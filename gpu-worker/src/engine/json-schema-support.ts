/**
 * Which JSON Schema a grammar can enforce, checked before XGrammar sees it: a keyword XGrammar would ignore or
 * approximate (uniqueItems, multipleOf, not, if/then, minProperties, ...) would let outputs through that do not
 * validate, so it is refused with the path of the subschema instead. Annotations (title, description, examples,
 * ...) are fine. Keywords that only apply to one type get that type when the schema leaves it out (a narrowing:
 * every output still validates). Bounded `number`s and `integer`s, and choices between literal values (enums,
 * anyOf of consts), are swapped for placeholders that grammar.ts replaces with grammars of ours (number-range.ts,
 * `literalTrie`), since XGrammar 0.1.27 gets those wrong.
 *
 * XGrammar 0.1.27 also writes character classes for `pattern`, `minLength` and `maxLength` strings that let raw
 * control characters, `"` and `\` into the JSON text (invalid JSON); `sanitizeStringClasses` takes those out of
 * every class (a narrowing: such characters are simply not generated in those strings).
 *
 * Not enforced exactly, and documented so: `oneOf` is generated as `anyOf` (an output may match several branches;
 * with discriminated unions, the usual case, it cannot).
 *
 * @module
 */
import { type NumberBounds, numberRangeEbnf } from "./number-range.ts";

type Json = Record<string, unknown>;

/** A schema (part) the grammar engine cannot enforce; the message names where. */
export class UnsupportedSchemaError extends Error {
  override name = "UnsupportedSchemaError";
}

const ANNOTATIONS = ["title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated"];
const FAMILIES: Record<string, string[]> = {
  object: ["properties", "required", "additionalProperties"],
  array: ["items", "prefixItems", "minItems", "maxItems"],
  string: ["pattern", "minLength", "maxLength", "format"],
  number: ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"],
};
const GENERAL = ["type", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "readOnly", "writeOnly"];
const SUPPORTED = new Set([...ANNOTATIONS, ...GENERAL, ...Object.values(FAMILIES).flat()]);
const TYPES = new Set(["object", "array", "string", "number", "integer", "boolean", "null"]);

const isObject = (v: unknown): v is Json => typeof v === "object" && v !== null && !Array.isArray(v);

/** The schema to give XGrammar, and the grammar of each placeholder const it contains. */
export interface PreparedSchema {
  schema: Json | boolean;
  /** Placeholder string -> EBNF expression to put where XGrammar wrote the placeholder's JSON string. */
  splices: Map<string, string>;
}

type Scalar = string | number | boolean | null;
const isScalar = (v: unknown): v is Scalar => v === null || ["string", "number", "boolean"].includes(typeof v);

/** An EBNF string literal holding `text`. */
const literal = (text: string) => `"${text.replace(/\\/g, "\\\\").replace(/"/g, '\\"')}"`;

/**
 * The JSON texts of `values` as a trie: alternatives never share a first character. XGrammar 0.1.27 matches an
 * alternation of literals wrongly when a longer one comes before a shorter one it extends (["cone", "c"] lets
 * "coneone" through); a trie has no such pair.
 */
function literalTrie(values: Scalar[]): string {
  interface Node {
    end: boolean;
    next: Map<string, Node>;
  }
  const root: Node = { end: false, next: new Map() };
  for (const v of values) {
    let node = root;
    for (const ch of JSON.stringify(v)) {
      let child = node.next.get(ch);
      if (!child) {
        child = { end: false, next: new Map() };
        node.next.set(ch, child);
      }
      node = child;
    }
    node.end = true;
  }
  const emit = (node: Node): string => {
    const alternatives = node.end ? ['""'] : [];
    for (const [ch, child] of node.next) {
      let run = ch;
      let n = child;
      while (!n.end && n.next.size === 1) {
        const [c, only] = n.next.entries().next().value!;
        run += c;
        n = only;
      }
      const rest = n.next.size > 0 ? ` ${emit(n)}` : "";
      alternatives.push(`${literal(run)}${rest}`);
    }
    return alternatives.length === 1 ? alternatives[0]! : `(${alternatives.join(" | ")})`;
  };
  return `(${emit(root)})`;
}

/** The scalar values a branch allows when it is nothing but a const or an enum of scalars; else null. */
function scalarChoices(branch: unknown): Scalar[] | null {
  if (!isObject(branch)) return null;
  const keys = Object.keys(branch).filter((k) => !ANNOTATIONS.includes(k));
  if (keys.length === 1 && keys[0] === "const" && isScalar(branch.const)) return [branch.const];
  if (keys.length === 1 && keys[0] === "enum" && Array.isArray(branch.enum) && branch.enum.every(isScalar)) {
    return branch.enum as Scalar[];
  }
  return null;
}

/**
 * @throws UnsupportedSchemaError naming the JSON pointer of the first part that cannot be enforced
 */
export function prepareSchema(schema: unknown): PreparedSchema {
  const splices = new Map<string, string>();
  const splice = (ebnf: string) => {
    const placeholder = `__llama_edge_splice_${splices.size}__`;
    splices.set(placeholder, ebnf);
    return { const: placeholder };
  };
  const walk = (s: unknown, path: string): Json | boolean => {
    const at = path || "the top level";
    if (typeof s === "boolean") return s;
    if (!isObject(s)) throw new UnsupportedSchemaError(`${at}: a schema must be an object or a boolean`);
    const unknown = Object.keys(s).find((k) => !SUPPORTED.has(k));
    if (unknown) {
      throw new UnsupportedSchemaError(`${at}: '${unknown}' cannot be enforced by constrained decoding`);
    }
    const out: Json = { ...s };
    const families = Object.entries(FAMILIES)
      .filter(([, keys]) => keys.some((k) => k in s))
      .map(([f]) => f);
    if (families.length > 0) {
      const type = s.type ?? (families.length === 1 ? families[0] : undefined);
      const fits = (f: string) => f === type || (f === "number" && type === "integer");
      if (typeof type !== "string" || !families.every(fits)) {
        throw new UnsupportedSchemaError(
          `${at}: ${families.map((f) => FAMILIES[f]!.filter((k) => k in s).join(", ")).join(" and ")} need a single matching 'type'`,
        );
      }
      out.type = type;
    } else if (s.type !== undefined) {
      const types = Array.isArray(s.type) ? s.type : [s.type];
      if (types.length === 0 || !types.every((t) => typeof t === "string" && TYPES.has(t))) {
        throw new UnsupportedSchemaError(`${at}: 'type' must be a JSON type or a list of them`);
      }
    }
    for (const k of ["exclusiveMinimum", "exclusiveMaximum", "minimum", "maximum"]) {
      if (k in s && typeof s[k] !== "number") throw new UnsupportedSchemaError(`${at}: '${k}' must be a number`);
    }
    if ((out.type === "number" || out.type === "integer") && families.includes("number")) {
      const ebnf = numberRangeEbnf(s as NumberBounds, out.type === "integer");
      if (ebnf === null) throw new UnsupportedSchemaError(`${at}: no ${out.type} (up to 6 decimals) fits the bounds`);
      return splice(ebnf);
    }
    // Literal choices (an enum, or an anyOf/oneOf of consts and enums) become one trie, see literalTrie.
    const onlyEnum = Object.keys(s).every((k) => k === "enum" || k === "type" || ANNOTATIONS.includes(k));
    if (onlyEnum && Array.isArray(s.enum) && s.enum.every(isScalar)) {
      const allowed = (s.enum as Scalar[]).filter((v) => s.type === undefined || typeMatches(v, s.type));
      if (allowed.length === 0) throw new UnsupportedSchemaError(`${at}: no enum value has the schema's type`);
      return splice(literalTrie([...new Set(allowed)]));
    }
    for (const key of ["anyOf", "oneOf"]) {
      if (!Array.isArray(s[key]) || Object.keys(s).some((k) => k !== key && !ANNOTATIONS.includes(k))) continue;
      const branches = s[key] as unknown[];
      const choices = branches.map(scalarChoices);
      if (choices.every((c) => c !== null)) return splice(literalTrie([...new Set(choices.flat())]));
    }
    const sub = (key: string, v: unknown) => walk(v, `${path}/${key}`);
    const map = (key: string) => {
      if (!(key in s)) return;
      if (!isObject(s[key])) throw new UnsupportedSchemaError(`${at}: '${key}' must be an object of schemas`);
      out[key] = Object.fromEntries(
        Object.entries(s[key] as Json).map(([name, v]) => [
          name,
          sub(`${key}/${name.replace(/~/g, "~0").replace(/\//g, "~1")}`, v),
        ]),
      );
    };
    const list = (key: string) => {
      if (!(key in s)) return;
      if (!Array.isArray(s[key])) throw new UnsupportedSchemaError(`${at}: '${key}' must be a list of schemas`);
      out[key] = (s[key] as unknown[]).map((v, i) => sub(`${key}/${i}`, v));
    };
    map("properties");
    map("$defs");
    map("definitions");
    list("anyOf");
    list("oneOf");
    list("prefixItems");
    if ("items" in s) {
      if (Array.isArray(s.items)) throw new UnsupportedSchemaError(`${at}: 'items' as a list: use 'prefixItems'`);
      out.items = sub("items", s.items);
    }
    if (isObject(s.additionalProperties))
      out.additionalProperties = sub("additionalProperties", s.additionalProperties);
    return out;
  };
  return { schema: walk(schema, ""), splices };
}

/** Whether a scalar has the JSON type (or one of the types) given. */
function typeMatches(v: Scalar, type: unknown): boolean {
  const types = Array.isArray(type) ? type : [type];
  const t = v === null ? "null" : typeof v === "number" ? (Number.isInteger(v) ? "integer" : "number") : typeof v;
  return types.includes(t) || (t === "integer" && types.includes("number"));
}

/** Puts our grammars where XGrammar wrote their placeholders (as JSON strings) in its EBNF. */
export function splice(ebnf: string, splices: Map<string, string>): string {
  let out = ebnf;
  for (const [placeholder, rule] of splices) out = out.split(`"\\"${placeholder}\\""`).join(rule);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Character classes that stay inside a JSON string

/** Code points a JSON string cannot hold unescaped: controls, the quote and the backslash. */
const FORBIDDEN: [number, number][] = [
  [0x00, 0x1f],
  [0x22, 0x22],
  [0x5c, 0x5c],
];
const NAMED_ESCAPES: Record<string, number> = { n: 10, r: 13, t: 9, "0": 0 };

/** Reads one class item at `i` (after the `[`): a code point, escaped or not. */
function readChar(body: string, i: number): [number, number] {
  if (body[i] !== "\\") return [body.codePointAt(i)!, i + (body.codePointAt(i)! > 0xffff ? 2 : 1)];
  const e = body[i + 1]!;
  const hex = { x: 2, u: 4, U: 8 }[e];
  if (hex) return [Number.parseInt(body.slice(i + 2, i + 2 + hex), 16), i + 2 + hex];
  return [NAMED_ESCAPES[e] ?? e.codePointAt(0)!, i + 2];
}

/** The code point ranges of a class body (without brackets and `^`). */
function classRanges(body: string): [number, number][] {
  const ranges: [number, number][] = [];
  let i = 0;
  while (i < body.length) {
    const [lo, next] = readChar(body, i);
    if (body[next] === "-" && next + 1 < body.length) {
      const [hi, after] = readChar(body, next + 1);
      ranges.push([lo, hi]);
      i = after;
    } else {
      ranges.push([lo, lo]);
      i = next;
    }
  }
  return ranges;
}

/** Sorted, merged complement-free union minus FORBIDDEN. */
function subtractForbidden(ranges: [number, number][]): [number, number][] {
  let out = ranges;
  for (const [flo, fhi] of FORBIDDEN) {
    out = out.flatMap(([lo, hi]): [number, number][] => {
      if (hi < flo || lo > fhi) return [[lo, hi]];
      const parts: [number, number][] = [];
      if (lo < flo) parts.push([lo, flo - 1]);
      if (hi > fhi) parts.push([fhi + 1, hi]);
      return parts;
    });
  }
  return out;
}

const escapeCodePoint = (c: number) =>
  /[0-9A-Za-z]/.test(String.fromCodePoint(c)) ? String.fromCodePoint(c) : `\\U${c.toString(16).padStart(8, "0")}`;
const renderRanges = (ranges: [number, number][]) =>
  ranges
    .map(([lo, hi]) => (lo === hi ? escapeCodePoint(lo) : `${escapeCodePoint(lo)}-${escapeCodePoint(hi)}`))
    .join("");

/**
 * Rewrites every character class outside XGrammar's own `basic_*` rules (which are right, and where an escape
 * legitimately follows a backslash) so that it never matches a control character, `"` or `\`.
 */
export function sanitizeStringClasses(ebnf: string): string {
  return ebnf
    .split("\n")
    .map((line) => {
      if (line.startsWith("basic_")) return line;
      // A class: `[`, optional `^`, items (escaped characters or anything but `]`), `]`; strings are skipped whole.
      return line.replace(
        /("(?:[^"\\]|\\.)*")|\[(\^?)((?:\\U[0-9a-fA-F]{8}|\\u[0-9a-fA-F]{4}|\\x[0-9a-fA-F]{2}|\\.|[^\]\\])*)\]/g,
        (whole, str: string | undefined, negated: string, body: string) => {
          if (str !== undefined) return whole;
          const ranges = classRanges(body);
          if (negated) return `[^${renderRanges([...ranges, ...FORBIDDEN])}]`;
          const kept = subtractForbidden(ranges);
          if (kept.length === 0) {
            throw new UnsupportedSchemaError(`a pattern needs characters a JSON string must escape (${whole})`);
          }
          return `[${renderRanges(kept)}]`;
        },
      );
    })
    .join("\n");
}
