/**
 * What the console remembers, in `sessionStorage` only: the API key, the admin secret and the 429s this tab
 * received. Closing the tab forgets them; nothing goes to localStorage, cookies, URLs or logs.
 *
 * @module
 */
import { useEffect, useState } from "preact/hooks";

const PREFIX = "llama-edge.";
/** Same-tab change notifications (the `storage` event only fires in other tabs). */
const CHANGE = "llama-edge-session";

/** How long a secret field waits after the last keystroke before the page uses the new value. */
export const TYPING_PAUSE_MS = 300;

export type SessionName = "api-key" | "admin-secret" | "recent-429s";

export function readSession(name: SessionName): string {
  return sessionStorage.getItem(PREFIX + name) ?? "";
}

export function writeSession(name: SessionName, value: string): void {
  if (value) sessionStorage.setItem(PREFIX + name, value);
  else sessionStorage.removeItem(PREFIX + name);
  window.dispatchEvent(new CustomEvent(CHANGE, { detail: name }));
}

/** A session value as component state, kept in step with the other components that use it. */
export function useSession(name: SessionName): [string, (value: string) => void] {
  const [value, setValue] = useState(() => readSession(name));
  useEffect(() => {
    const onChange = (e: Event) => {
      if ((e as CustomEvent<SessionName>).detail === name) setValue(readSession(name));
    };
    window.addEventListener(CHANGE, onChange);
    return () => window.removeEventListener(CHANGE, onChange);
  }, [name]);
  return [value, (v: string) => writeSession(name, v)];
}

/** A 429 this tab received (the API does not list past 429s, so the console keeps its own). */
export interface Seen429 {
  /** Epoch ms. */
  at: number;
  code: string | null;
  message: string;
  retryAfterS: number | null;
}

const MAX_429S = 20;

export function recent429s(): Seen429[] {
  try {
    return JSON.parse(readSession("recent-429s") || "[]") as Seen429[];
  } catch {
    return [];
  }
}

export function record429(entry: Seen429): void {
  writeSession("recent-429s", JSON.stringify([entry, ...recent429s()].slice(0, MAX_429S)));
}
