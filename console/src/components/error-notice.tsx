import type { ApiError } from "../api/api-error.ts";

/** An API error as one readable line: status, OpenAI error code, message and, for a 429, when to retry. */
export function ErrorNotice({ error }: { error: ApiError | null }) {
  if (!error) return null;
  return (
    <p class="error" role="alert">
      {error.describe()}
    </p>
  );
}
