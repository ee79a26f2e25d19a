/**
 * Client-side routing between the console's pages with the History API. The gateway serves index.html for any
 * page URL (Workers static assets in single-page-application mode), so reloads and shared links work.
 *
 * @module
 */
import { useEffect, useState } from "preact/hooks";

export const pages = [
  { path: "/", title: "Playground" },
  { path: "/usage", title: "Usage" },
  { path: "/keys", title: "Admin" },
] as const;
export type PagePath = (typeof pages)[number]["path"];

const NAVIGATE = "llama-edge-navigate";

export function navigate(path: string): void {
  if (path === location.pathname) return;
  history.pushState(null, "", path);
  window.dispatchEvent(new Event(NAVIGATE));
}

/** The current page, following links, back and forward. */
export function usePage(): PagePath | null {
  const [path, setPath] = useState(location.pathname);
  useEffect(() => {
    const update = () => setPath(location.pathname);
    window.addEventListener("popstate", update);
    window.addEventListener(NAVIGATE, update);
    return () => {
      window.removeEventListener("popstate", update);
      window.removeEventListener(NAVIGATE, update);
    };
  }, []);
  return pages.find((p) => p.path === path)?.path ?? null;
}

/** Click handler for in-console links: a plain left click navigates without reloading; others keep the default. */
export function onLinkClick(e: MouseEvent): void {
  const a = e.currentTarget as HTMLAnchorElement;
  if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  e.preventDefault();
  navigate(a.pathname);
}
