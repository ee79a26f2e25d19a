/**
 * Playground (`/`): chat with a model through `POST /v1/chat/completions`, streamed, with TTFT and tokens/s per
 * reply, a Stop button (closing the stream cancels the request at the worker) and the same request as code.
 *
 * @module
 */
import { useEffect, useId, useRef, useState } from "preact/hooks";
import { type ApiError, asApiError } from "../api/api-error.ts";
import { type ChatRequest, PublicApi } from "../api/public-api.ts";
import { CopyButton } from "../components/copy-button.tsx";
import { ErrorNotice } from "../components/error-notice.tsx";
import { SecretField } from "../components/secret-field.tsx";
import { record429, TYPING_PAUSE_MS, useSession } from "../session.ts";
import { snippets } from "../snippets.ts";

interface ReplyStats {
  /** ms from sending to the first token. */
  ttftMs: number | null;
  tokens: number;
  /** Whether `tokens` counts chunks (the stream was stopped before the usage chunk). */
  approximate: boolean;
  tokensPerS: number | null;
}

interface Turn {
  role: "user" | "assistant";
  content: string;
  status?: "streaming" | "done" | "stopped" | "failed";
  finishReason?: string | null;
  stats?: ReplyStats;
}

/** The sampling controls as typed: empty means "the server's default" and is left out of the request. */
interface Sampling {
  temperature: string;
  top_p: string;
  max_tokens: string;
  stop: string;
  seed: string;
}

const EXAMPLE: Turn = { role: "user", content: "Hello!" };
const NO_SAMPLING: Sampling = { temperature: "", top_p: "", max_tokens: "", stop: "", seed: "" };

function buildRequest(model: string, system: string, turns: Turn[], s: Sampling): ChatRequest {
  const messages: ChatRequest["messages"] = [];
  if (system.trim()) messages.push({ role: "system", content: system });
  for (const t of turns) if (t.content) messages.push({ role: t.role, content: t.content });
  const request: ChatRequest = { model, messages };
  if (s.temperature !== "") request.temperature = Number(s.temperature);
  if (s.top_p !== "") request.top_p = Number(s.top_p);
  if (s.max_tokens !== "") request.max_tokens = Number(s.max_tokens);
  const stop = s.stop.split("\n").filter((x) => x !== "");
  if (stop.length) request.stop = stop;
  if (s.seed !== "") request.seed = Number(s.seed);
  return request;
}

function statsLine(s: ReplyStats): string {
  const parts = [];
  if (s.ttftMs !== null) parts.push(`TTFT ${Math.round(s.ttftMs)} ms`);
  if (s.tokensPerS !== null) parts.push(`${s.tokensPerS.toFixed(1)} tokens/s`);
  parts.push(`${s.approximate ? "≈" : ""}${s.tokens} tokens`);
  return parts.join(" · ");
}

export function Playground() {
  const [apiKey] = useSession("api-key");
  const [models, setModels] = useState<string[]>([]);
  const [model, setModel] = useState("");
  const [system, setSystem] = useState("");
  const [sampling, setSampling] = useState<Sampling>(NO_SAMPLING);
  const [turns, setTurns] = useState<Turn[]>([]);
  const [input, setInput] = useState("");
  const [error, setError] = useState<ApiError | null>(null);
  const [running, setRunning] = useState<AbortController | null>(null);
  const ids = { model: useId(), system: useId(), input: useId(), stop: useId() };

  // The model picker follows the key: /v1/models lists what this key may use.
  useEffect(() => {
    setModels([]);
    if (!apiKey) return;
    let live = true;
    // Once typing pauses: no request per keystroke.
    const timer = setTimeout(() => {
      new PublicApi(apiKey)
        .models()
        .then((list) => {
          if (!live) return;
          setModels(list);
          setModel((m) => (list.includes(m) ? m : (list[0] ?? "")));
          setError(null);
        })
        .catch((e) => live && setError(asApiError(e)));
    }, TYPING_PAUSE_MS);
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [apiKey]);

  // Keep the newest text in view while it streams.
  const log = useRef<HTMLDivElement>(null);
  useEffect(() => {
    log.current?.scrollTo({ top: log.current.scrollHeight });
  }, [turns]);

  const updateLast = (f: (t: Turn) => Turn) => setTurns((ts) => [...ts.slice(0, -1), f(ts.at(-1)!)]);

  async function send(e: Event) {
    e.preventDefault();
    if (!apiKey || !model || running) return;
    const history: Turn[] = [...turns, ...(input.trim() ? [{ role: "user" as const, content: input }] : [])];
    const request = buildRequest(model, system, history, sampling);
    const controller = new AbortController();
    setTurns([...history, { role: "assistant", content: "", status: "streaming" }]);
    setInput("");
    setError(null);
    setRunning(controller);
    const start = performance.now();
    let first: number | null = null;
    let chunks = 0;
    const stats = (tokens: number, approximate: boolean): ReplyStats => {
      const end = performance.now();
      const decodeS = first === null ? 0 : (end - first) / 1000;
      return {
        ttftMs: first === null ? null : first - start,
        tokens,
        approximate,
        // Decode speed: tokens after the first over the time since the first.
        tokensPerS: tokens > 1 && decodeS > 0 ? (tokens - 1) / decodeS : null,
      };
    };
    try {
      const result = await new PublicApi(apiKey).streamChat(request, {
        signal: controller.signal,
        onText: (text) => {
          first ??= performance.now();
          chunks += 1;
          updateLast((t) => ({ ...t, content: t.content + text, stats: stats(chunks, true) }));
        },
      });
      const tokens = result.usage?.completion_tokens ?? result.chunks;
      updateLast((t) => ({
        ...t,
        status: "done",
        finishReason: result.finishReason,
        stats: stats(tokens, result.usage === null),
      }));
    } catch (err) {
      if (controller.signal.aborted) {
        updateLast((t) => ({ ...t, status: "stopped", stats: stats(chunks, true) }));
      } else {
        const apiError = asApiError(err);
        if (apiError.status === 429) {
          record429({
            at: Date.now(),
            code: apiError.code,
            message: apiError.message,
            retryAfterS: apiError.retryAfterS,
          });
        }
        setError(apiError);
        updateLast((t) => ({ ...t, status: "failed" }));
      }
    } finally {
      setRunning(null);
    }
  }

  const field = (name: keyof Sampling) => ({
    value: sampling[name],
    onInput: (e: Event) => setSampling({ ...sampling, [name]: (e.currentTarget as HTMLInputElement).value }),
  });
  // What Send would send now (an example message while there is nothing to send).
  const next: Turn[] = input.trim() ? [{ role: "user", content: input }] : turns.length ? [] : [EXAMPLE];
  const request = buildRequest(model || "MODEL", system, [...turns, ...next], sampling);
  const code = snippets(request, `${location.origin}/v1`);

  return (
    <div class="playground">
      <section class="settings" aria-labelledby="settings-title">
        <h2 id="settings-title">Settings</h2>
        <SecretField
          label="API key"
          session="api-key"
          placeholder="sk-…"
          help="Kept in this tab only (sessionStorage) and sent only in the Authorization header."
        />
        <div class="field">
          <label for={ids.model}>Model</label>
          <select
            id={ids.model}
            value={model}
            disabled={!models.length}
            onChange={(e) => setModel(e.currentTarget.value)}
          >
            {models.length === 0 && <option value="">{apiKey ? "Loading…" : "Enter an API key first"}</option>}
            {models.map((m) => (
              <option key={m} value={m}>
                {m}
              </option>
            ))}
          </select>
        </div>
        <div class="field">
          <label for={ids.system}>System prompt</label>
          <textarea id={ids.system} rows={3} value={system} onInput={(e) => setSystem(e.currentTarget.value)} />
        </div>
        <fieldset class="sampling">
          <legend>Sampling (empty: the server's default)</legend>
          <NumberField label="Temperature" min={0} max={2} step={0.1} {...field("temperature")} />
          <NumberField label="top_p" min={0} max={1} step={0.05} {...field("top_p")} />
          <NumberField label="max_tokens" min={1} step={1} {...field("max_tokens")} />
          <NumberField label="Seed" step={1} {...field("seed")} />
          <div class="field wide">
            <label for={ids.stop}>Stop sequences (one per line)</label>
            <textarea id={ids.stop} rows={2} {...field("stop")} />
          </div>
        </fieldset>
      </section>

      <section class="chat" aria-labelledby="chat-title">
        <h2 id="chat-title">Conversation</h2>
        <div class="turns" ref={log} role="log" aria-label="Conversation" aria-busy={running !== null}>
          {turns.length === 0 && <p class="help">Messages and streamed replies appear here.</p>}
          {turns.map((t, i) => (
            <article
              key={i}
              class={`turn ${t.role}`}
              data-status={t.status}
              aria-label={t.role === "user" ? "You" : "Assistant"}
            >
              <h3 class="who">{t.role === "user" ? "You" : "Assistant"}</h3>
              <div class="content">{t.content}</div>
              {t.stats && (
                <p class="stats">
                  {statsLine(t.stats)}
                  {t.status === "stopped" && " · stopped"}
                  {t.finishReason && ` · finish: ${t.finishReason}`}
                </p>
              )}
            </article>
          ))}
        </div>
        <ErrorNotice error={error} />
        <form class="composer" onSubmit={send}>
          <label for={ids.input}>Message</label>
          <textarea
            id={ids.input}
            rows={3}
            value={input}
            placeholder="Write a message. Enter sends, Shift+Enter adds a line."
            onInput={(e) => setInput(e.currentTarget.value)}
            onKeyDown={(e) => {
              if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
            }}
          />
          <div class="row">
            <button type="submit" disabled={!apiKey || !model || running !== null}>
              Send
            </button>
            <button type="button" class="danger" disabled={running === null} onClick={() => running?.abort()}>
              Stop
            </button>
            <button
              type="button"
              class="secondary"
              disabled={running !== null || turns.length === 0}
              onClick={() => {
                setTurns([]);
                setError(null);
              }}
            >
              Clear
            </button>
          </div>
        </form>
        <details class="code">
          <summary>Code for this request</summary>
          {(["curl", "python", "javascript"] as const).map((lang) => (
            <div key={lang} class="snippet">
              <div class="row">
                <h3>{{ curl: "curl", python: "Python (openai)", javascript: "JavaScript (openai)" }[lang]}</h3>
                <CopyButton text={code[lang]} label={`Copy ${lang}`} />
              </div>
              <pre>
                <code>{code[lang]}</code>
              </pre>
            </div>
          ))}
        </details>
      </section>
    </div>
  );
}

function NumberField(props: {
  label: string;
  value: string;
  min?: number;
  max?: number;
  step: number;
  onInput: (e: Event) => void;
}) {
  const id = useId();
  const { label, ...input } = props;
  return (
    <div class="field">
      <label for={id}>{label}</label>
      <input id={id} type="number" inputMode="decimal" {...input} />
    </div>
  );
}
