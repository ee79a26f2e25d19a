/**
 * The engine's thread. ONNX Runtime's `run()` blocks the thread it is called on for the whole step, so the engine
 * lives here and the main thread stays free for NATS (pings, heartbeats, cancels, pulls). Messages from the host
 * are handled between steps (the engine yields with setImmediate after each one), which is what bounds a cancel
 * to one step.
 *
 * @module
 */
import { parentPort, workerData } from "node:worker_threads";
import { type OutputPlan, planOutput, withToolCalls } from "../chat/output-plan.ts";
import type { LLMEngine } from "../engine/llm-engine.ts";
import type { EngineRequest } from "../engine/types.ts";
import type { HostRequest, HostToThread, ThreadError, ThreadInit, ThreadToHost } from "./engine-thread-protocol.ts";

const port = parentPort;
if (!port) throw new Error("engine-thread.ts must run in a worker thread (see engine-host.ts)");
const send = (m: ThreadToHost) => port.postMessage(m);

/** `defaultParam`: the request field to blame when the error names none (a grammar that does not compile). */
function toThreadError(e: unknown, defaultParam?: string): ThreadError {
  if (!(e instanceof Error)) return { name: "Error", message: String(e) };
  const { code } = e as { code?: unknown };
  const param = (e as { param?: unknown }).param ?? (e.name === "GrammarError" ? defaultParam : undefined);
  return {
    name: e.name,
    message: e.message,
    ...(typeof code === "string" ? { code } : {}),
    ...(typeof param === "string" ? { param } : {}),
  };
}

async function main(init: ThreadInit): Promise<void> {
  let engine: LLMEngine;
  const started = performance.now();
  let compiledAt: number | undefined; // the last compile progress: weights packed
  try {
    const mod = (await import(init.engineModule)) as { LLMEngine: typeof LLMEngine };
    engine = await mod.LLMEngine.create({
      ...init.engineOptions,
      onProgress: (stage, done, total) => {
        if (stage === "compile") compiledAt = performance.now();
        send({ type: "progress", stage, done, total });
      },
    });
  } catch (e) {
    send({ type: "startFailed", error: toThreadError(e) });
    return;
  }
  const ready = performance.now();
  const { modelName, maxModelLen, maxNumSeqs, blockSize, numBlocks } = engine.config;
  send({
    type: "ready",
    config: { modelName, maxModelLen, maxNumSeqs, blockSize, numBlocks },
    stats: engine.stats(),
    startup: {
      compileSeconds: ((compiledAt ?? started) - started) / 1000,
      loadSeconds: (ready - (compiledAt ?? started)) / 1000,
    },
  });
  // Also sent after every finished request, so freed blocks show in the host at once.
  setInterval(() => send({ type: "stats", stats: engine.stats() }), init.statsIntervalMs);

  const run = async (req: HostRequest) => {
    let plan: OutputPlan | undefined;
    try {
      const { prompt, output, ...rest } = req;
      const chat = typeof prompt === "string" || Array.isArray(prompt) ? null : prompt;
      plan = planOutput(engine.tokenizer, output ?? {}, chat?.tools);
      const engineReq: EngineRequest = {
        ...rest,
        prompt: chat
          ? engine.tokenizer.encodeChat(chat.messages, {
              addGenerationPrompt: chat.addGenerationPrompt,
              tools: chat.tools,
            })
          : (prompt as string | number[]),
        ...(plan.grammar ? { grammar: plan.grammar } : {}),
      };
      const events = engine.submit(engineReq);
      for await (const event of plan.toolCalls ? withToolCalls(events, plan.toolCalls) : events) {
        send({ type: "event", requestId: req.requestId, event });
      }
    } catch (e) {
      send({ type: "failed", requestId: req.requestId, error: toThreadError(e, plan?.grammarParam) });
    }
    send({ type: "stats", stats: engine.stats() });
  };

  port?.on("message", (m: HostToThread) => {
    switch (m.type) {
      case "submit":
        void run(m.request);
        break;
      case "abort":
        engine.abort(m.requestId);
        break;
      case "prefixHashes": {
        const hashes = engine.prefixBlockHashes(m.limit);
        send({ type: "prefixHashes", callId: m.callId, hashes });
        break;
      }
    }
  });
}

void main(workerData as ThreadInit);
