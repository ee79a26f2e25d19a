/**
 * The llama-edge console: Playground, Usage and Admin pages over the gateway's public and admin APIs (it has no
 * endpoints of its own). Served by the gateway as Workers static assets; see console/README.md.
 *
 * @module
 */
import "uplot/dist/uPlot.min.css";
import "./style.css";
import { render } from "preact";
import { useEffect } from "preact/hooks";
import { Admin } from "./pages/admin.tsx";
import { Playground } from "./pages/playground.tsx";
import { Usage } from "./pages/usage.tsx";
import { onLinkClick, pages, usePage } from "./router.ts";

const views = { "/": Playground, "/usage": Usage, "/keys": Admin } as const;

function App() {
  const page = usePage();
  const title = pages.find((p) => p.path === page)?.title ?? "Not found";
  useEffect(() => {
    document.title = `${title} · llama-edge console`;
  }, [title]);
  const View = page ? views[page] : null;
  return (
    <>
      <a class="skip" href="#main">
        Skip to content
      </a>
      <header>
        <span class="brand">llama-edge</span>
        <nav aria-label="Console">
          {pages.map((p) => (
            <a key={p.path} href={p.path} aria-current={p.path === page ? "page" : undefined} onClick={onLinkClick}>
              {p.title}
            </a>
          ))}
        </nav>
        <a class="api-link" href="https://platform.openai.com/docs/api-reference" rel="noreferrer">
          OpenAI-compatible API at /v1
        </a>
      </header>
      <main id="main" tabIndex={-1}>
        <h1>{title}</h1>
        {View ? <View /> : <p>This page does not exist. The console has the pages above.</p>}
      </main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
