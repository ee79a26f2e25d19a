/**
 * Loads XGrammar's WebAssembly build (`@mlc-ai/web-xgrammar`), the grammar engine behind vLLM's, SGLang's and
 * TensorRT-LLM's structured output.
 *
 * NOTE on packaging: the package declares `"type": "module"`, but its `lib/index.js` is a UMD bundle (it assigns
 * `exports.*` and calls `require("url")`). Node therefore loads it as ESM, where `exports` and `require` do not
 * exist, and the import fails. The same file loaded as CommonJS works, so we copy it once under a `.cjs` name into
 * the cache directory (atomically: concurrent workers may race) and `require` the copy. The WebAssembly binary is
 * inlined in the bundle as base64, so the one file is all it needs. This runs wherever the engine runs, including
 * the worker service's engine thread (a `worker_threads` Worker: the bundle's "is this a web worker" check looks
 * for `importScripts`, which Node's workers lack, so it takes its Node path there too).
 *
 * Each call returns a fresh instance (its own WebAssembly memory): the build aborts instead of throwing on input it
 * cannot handle, and an aborted instance is unusable afterwards (see grammar.ts), so callers must be able to
 * replace one.
 *
 * @module
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import type * as XGrammar from "@mlc-ai/web-xgrammar";
import { cacheDir } from "../model/default-model.ts";

export type XGrammarModule = typeof XGrammar;
export type { CompiledGrammar, GrammarCompiler, GrammarMatcher, TokenizerInfo } from "@mlc-ai/web-xgrammar";

const require = createRequire(import.meta.url);

/** A new XGrammar instance. Its WebAssembly is compiled on the first call into it (about a second). */
export function loadXGrammar(): XGrammarModule {
  const entry = require.resolve("@mlc-ai/web-xgrammar");
  const pkg = JSON.parse(readFileSync(join(dirname(entry), "..", "package.json"), "utf8")) as { version: string };
  const copy = join(cacheDir(), "xgrammar", `web-xgrammar-${pkg.version}.cjs`);
  if (!existsSync(copy)) {
    mkdirSync(dirname(copy), { recursive: true });
    const tmp = `${copy}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
    try {
      copyFileSync(entry, tmp);
      renameSync(tmp, copy);
    } finally {
      rmSync(tmp, { force: true });
    }
  }
  delete require.cache[copy]; // a fresh closure, hence a fresh WebAssembly instance
  return require(copy) as XGrammarModule;
}
