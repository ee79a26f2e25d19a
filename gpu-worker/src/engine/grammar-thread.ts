/**
 * The grammar thread: XGrammar's compiler and every sequence's matcher live here, off the engine thread, so that
 * compiling a new schema never stalls the running streams and the next step's bitmasks are computed while the
 * engine thread runs the model (ONNX Runtime's run blocks its own thread). See grammar-worker.ts for the protocol.
 *
 * @module
 */
import { parentPort, workerData } from "node:worker_threads";
import { GrammarCache, type GrammarVocabulary, type SequenceGrammar } from "./grammar.ts";
import type { FromGrammarThread, ToGrammarThread } from "./grammar-worker.ts";

const port = parentPort;
if (!port) throw new Error("grammar-thread.ts must run in a worker thread (see grammar-worker.ts)");
const cache = GrammarCache.for(workerData as GrammarVocabulary);
const matchers = new Map<number, SequenceGrammar>();
/** Ids closed while their grammar was still compiling. */
const closedEarly = new Set<number>();
const send = (m: FromGrammarThread, transfer: ArrayBuffer[] = []) => port.postMessage(m, transfer);

const errorOf = (e: unknown) =>
  e instanceof Error ? { name: e.name, message: e.message } : { name: "Error", message: String(e) };

/** The masks of `ids`, packed into one transferable buffer (words per mask: ceil(vocabSize / 32)). */
async function masksOf(ids: number[]): Promise<ArrayBuffer> {
  const words = Math.ceil((workerData as GrammarVocabulary).vocabSize / 32);
  const out = new Int32Array(ids.length * words);
  for (const [i, id] of ids.entries()) out.set(await matchers.get(id)!.nextTokenBitmask(), i * words);
  return out.buffer;
}

port.on("message", async (m: ToGrammarThread) => {
  switch (m.type) {
    case "open":
      try {
        const matcher = await cache.matcher(m.spec);
        if (closedEarly.delete(m.id)) {
          matcher.dispose();
          return;
        }
        matchers.set(m.id, matcher);
        const mask = await masksOf([m.id]);
        send({ type: "opened", call: m.call, mask }, [mask]);
      } catch (e) {
        send({ type: "opened", call: m.call, error: errorOf(e) });
      }
      return;
    case "advance": {
      const ids: number[] = [];
      const failed: [number, string][] = [];
      for (const [id, token] of m.accepts) {
        const matcher = matchers.get(id);
        if (!matcher) continue; // closed meanwhile
        if (!matcher.accept(token)) failed.push([id, `token ${token} is outside the grammar`]);
        else if (!matcher.isTerminated) ids.push(id);
      }
      const masks = await masksOf(ids);
      send({ type: "masks", step: m.step, ids, masks, failed }, [masks]);
      return;
    }
    case "close":
      if (!matchers.has(m.id)) closedEarly.add(m.id);
      matchers.get(m.id)?.dispose();
      matchers.delete(m.id);
      return;
    case "compile":
      try {
        const t = performance.now();
        if (m.warmUpOnly) await cache.warmUp();
        else await cache.compile(m.spec);
        send({ type: "compiled", call: m.call, ms: performance.now() - t, hits: cache.hits, misses: cache.misses });
      } catch (e) {
        send({ type: "compiled", call: m.call, error: errorOf(e) });
      }
      return;
  }
});
