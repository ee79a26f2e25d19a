/**
 * The playground's current request as code to paste: curl, and the official `openai` clients for Python and
 * JavaScript. The key is read from OPENAI_API_KEY, so it never appears on screen or in a copied snippet.
 *
 * @module
 */
import type { ChatRequest } from "./api/public-api.ts";

export interface Snippets {
  curl: string;
  python: string;
  javascript: string;
}

/** Python literals for JSON values (True/False/None differ). */
function toPython(value: unknown, depth = 0): string {
  const pad = "    ".repeat(depth + 1);
  const end = "    ".repeat(depth);
  if (value === null) return "None";
  if (typeof value === "boolean") return value ? "True" : "False";
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return `[\n${value.map((v) => pad + toPython(v, depth + 1)).join(",\n")},\n${end}]`;
  }
  if (typeof value === "object") {
    const entries = Object.entries(value as Record<string, unknown>);
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}: ${toPython(v, depth + 1)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

export function snippets(request: ChatRequest, baseUrl: string): Snippets {
  const body = { ...request, stream: true };
  const json = JSON.stringify(body, null, 2);
  // Single quotes around the body for the shell: escape the ones inside.
  const curl = [
    `curl ${baseUrl}/chat/completions \\`,
    `  -H "Authorization: Bearer $OPENAI_API_KEY" \\`,
    `  -H "Content-Type: application/json" \\`,
    `  -d '${json.replaceAll("'", "'\\''")}'`,
  ].join("\n");

  const { model, messages, ...sampling } = request;
  const pyArgs = [
    `model=${JSON.stringify(model)}`,
    `messages=${toPython(messages, 1)}`,
    ...Object.entries(sampling).map(([k, v]) => `${k}=${toPython(v, 1)}`),
    "stream=True",
  ];
  const python = [
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(baseUrl)})  # reads OPENAI_API_KEY`,
    "stream = client.chat.completions.create(",
    ...pyArgs.map((a) => `    ${a},`),
    ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    '        print(chunk.choices[0].delta.content or "", end="", flush=True)',
  ].join("\n");

  const javascript = [
    'import OpenAI from "openai";',
    "",
    `const client = new OpenAI({ baseURL: ${JSON.stringify(baseUrl)} }); // reads OPENAI_API_KEY`,
    `const stream = await client.chat.completions.create(${json});`,
    "for await (const chunk of stream) {",
    '  process.stdout.write(chunk.choices[0]?.delta?.content ?? "");',
    "}",
  ].join("\n");

  return { curl, python, javascript };
}
