/**
 * Stop strings over streamed text. Text that could still turn out to be the start of a stop string is held
 * back, so a stop string split across deltas is never partly emitted.
 *
 * @module
 */

/**
 * @example
 * const c = new StopStringChecker(["\nUser:"]);
 * c.push("Hi!\nUs"); // { emit: "Hi!", stopped: false }: "\nUs" may begin the stop string
 * c.push("er: ok");  // { emit: "", stopped: true }
 */
export class StopStringChecker {
  private readonly stops: string[];
  /** Longest text that may be held back: one character short of the longest stop string. */
  private readonly maxHeld: number;
  private held = "";
  private stopped = false;

  constructor(stops: string[]) {
    this.stops = stops.filter((s) => s.length > 0);
    this.maxHeld = Math.max(0, ...this.stops.map((s) => s.length - 1));
  }

  /**
   * Feeds the next piece of generated text.
   * @returns the text that is now safe to emit; on a stop, the text before the stop string and `stopped`.
   * Once stopped, every later push returns nothing.
   */
  push(delta: string): { emit: string; stopped: boolean } {
    if (this.stopped) return { emit: "", stopped: true };
    const text = this.held + delta;
    // The stop string that completes first wins (on the same last character, the longer one), which makes the
    // result independent of how the text was split into deltas. Held text never contains a whole stop string.
    let at = -1;
    let end = Number.POSITIVE_INFINITY;
    for (const s of this.stops) {
      const i = text.indexOf(s);
      if (i >= 0 && (i + s.length < end || (i + s.length === end && i < at))) {
        at = i;
        end = i + s.length;
      }
    }
    if (at >= 0) {
      this.stopped = true;
      this.held = "";
      return { emit: text.slice(0, at), stopped: true };
    }
    const keep = this.partialMatchLength(text);
    this.held = text.slice(text.length - keep);
    return { emit: text.slice(0, text.length - keep), stopped: false };
  }

  /** At the end of generation (no stop string hit): the held-back text, which is now known to be output. */
  flush(): string {
    const rest = this.held;
    this.held = "";
    return rest;
  }

  /** Length of the longest suffix of text that is a proper prefix of some stop string. */
  private partialMatchLength(text: string): number {
    for (let k = Math.min(this.maxHeld, text.length); k > 0; k--) {
      const tail = text.slice(text.length - k);
      if (this.stops.some((s) => s.length > k && s.startsWith(tail))) return k;
    }
    return 0;
  }
}
