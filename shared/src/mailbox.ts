import type { DispatchError } from "./errors.ts";

/** A single-consumer queue whose `next()` rejects once `fail()` was called: the subscription, the timers and the
 *  abort signal all feed one loop. */
export class Mailbox<T> {
  #items: T[] = [];
  #failure: DispatchError | undefined;
  #wake: (() => void) | undefined;

  push(item: T): void {
    this.#items.push(item);
    this.#wake?.();
  }

  fail(error: DispatchError): void {
    this.#failure ??= error;
    this.#wake?.();
  }

  /** Read on after a failure (e.g. to collect one last message after a cancel). */
  clearFailure(): void {
    this.#failure = undefined;
  }

  async next(): Promise<T> {
    for (;;) {
      if (this.#failure) throw this.#failure;
      const item = this.#items.shift();
      if (item !== undefined) return item;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
      this.#wake = undefined;
    }
  }
}
