/** console/dist: the static assets the gateway serves. */
export const distDir: string;
/** Builds the console into distDir (index.html, app.js, app.css). */
export function buildConsole(): Promise<void>;
