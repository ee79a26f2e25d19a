import { expect } from "vitest";
import { ModelLoadError } from "../src/model/errors.ts";

/** Assert `fn` throws a ModelLoadError whose message contains every one of `parts`. */
export function expectLoadError(fn: () => unknown, ...parts: string[]): ModelLoadError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ModelLoadError);
    for (const p of parts) expect((e as Error).message).toContain(p);
    return e as ModelLoadError;
  }
  throw new Error("expected a ModelLoadError");
}
