/**
 * Key material: generation (256 random bits), hashing (what is stored and what names a key's Durable Object),
 * and constant-time comparison. Web Crypto only, so it runs in workerd and in Node alike.
 *
 * @module
 */

const ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/** `len` base62 characters from rejection-sampled random bytes (no modulo bias). */
export function randomBase62(len: number): string {
  let out = "";
  while (out.length < len) {
    const bytes = crypto.getRandomValues(new Uint8Array(len * 2));
    for (const b of bytes) {
      if (b < 248) out += ALPHABET[b % 62]; // 248 = 4 * 62: larger bytes would skew the distribution
      if (out.length === len) break;
    }
  }
  return out;
}

/** `sk-` + 48 base62 characters: ~285 bits, far beyond guessing, and recognisable to secret scanners. */
export const generateApiKey = (): string => `sk-${randomBase62(48)}`;

export const generateKeyId = (): string => `key_${randomBase62(20)}`;

/** Keys this gateway could have issued; anything else is rejected without a Durable Object round trip. */
export const looksLikeApiKey = (s: string): boolean => /^sk-[0-9A-Za-z_-]{20,200}$/.test(s);

const hex = (buf: ArrayBuffer): string =>
  Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");

/** SHA-256 hex of the key. A fast hash is enough: keys are random, not passwords, so there is nothing to brute-force. */
export async function hashApiKey(key: string): Promise<string> {
  return hex(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key)));
}

/** Compares two secrets in time independent of where they differ (both are hashed first, so lengths match too). */
export async function secretsEqual(a: string, b: string): Promise<boolean> {
  const enc = new TextEncoder();
  const [da, db] = await Promise.all([
    crypto.subtle.digest("SHA-256", enc.encode(a)),
    crypto.subtle.digest("SHA-256", enc.encode(b)),
  ]);
  const x = new Uint8Array(da);
  const y = new Uint8Array(db);
  let diff = 0;
  for (let i = 0; i < x.length; i++) diff |= x[i]! ^ y[i]!;
  return diff === 0;
}
