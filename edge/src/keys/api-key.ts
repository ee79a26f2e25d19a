/**
 * Key material: generation, the key format's checksum, hashing (what is stored and what names a key's Durable
 * Object). Web Crypto only, so it runs in workerd and in Node alike.
 *
 * Keys are `sk-le-` + 42 random base62 characters (250 bits) + a 6-character checksum of the rest (the first 32
 * bits of its SHA-256, in base62), as GitHub's tokens carry a CRC32: a mistyped or made-up key is refused at the
 * edge without a Durable Object round trip, and secret scanners can tell a real key from noise. Keys issued
 * before the checksum (`sk-` + 48 base62 characters) keep working: they are looked up as before.
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

const KEY_PREFIX = "sk-le-";
const BODY_CHARS = 42;
const CHECK_CHARS = 6;
const CHECKED_KEY = /^sk-le-[0-9A-Za-z]{48}$/;
/** The format before checksums: only a lookup can tell such a key from a random string. */
const LEGACY_KEY = /^sk-[0-9A-Za-z]{48}$/;

/** The checksum of a key's prefix and body: 32 bits of SHA-256 as 6 base62 characters. */
async function checksum(prefixAndBody: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(prefixAndBody));
  let n = new DataView(digest).getUint32(0);
  let out = "";
  for (let i = 0; i < CHECK_CHARS; i++) {
    out = ALPHABET[n % 62] + out;
    n = Math.floor(n / 62);
  }
  return out;
}

export async function generateApiKey(): Promise<string> {
  const head = KEY_PREFIX + randomBase62(BODY_CHARS);
  return head + (await checksum(head));
}

/**
 * What a presented key is, from its text alone: `checked` (this format, checksum right), `legacy` (the format
 * before checksums) or `invalid` (anything else: no key this gateway issued).
 */
export async function keyFormat(token: string): Promise<"checked" | "legacy" | "invalid"> {
  if (CHECKED_KEY.test(token)) {
    const head = token.slice(0, -CHECK_CHARS);
    return (await checksum(head)) === token.slice(-CHECK_CHARS) ? "checked" : "invalid";
  }
  return LEGACY_KEY.test(token) ? "legacy" : "invalid";
}

export const generateKeyId = (): string => `key_${randomBase62(20)}`;

const hex = (buf: ArrayBuffer): string =>
  Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");

/** SHA-256 hex of the key. A fast hash is enough: keys are random, not passwords, so there is nothing to brute-force. */
export async function hashApiKey(key: string): Promise<string> {
  return hex(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key)));
}
