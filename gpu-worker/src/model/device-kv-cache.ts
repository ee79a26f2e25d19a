import type { LlamaConfig } from "./config.ts";
import type { KvCacheGraph } from "./llama-graph.ts";
import { DType, type DTypeCode, type GraphBuilder } from "./onnx-builder.ts";

/** Graph input names of layer l's key and value arrays; their outputs add `_out`. */
export const keyCacheName = (l: number): string => `key_cache_${l}`;
export const valueCacheName = (l: number): string => `value_cache_${l}`;

/**
 * The KV cache as device-resident arrays, updated in place: per layer a key and a value array [slots, kvHeads *
 * headDim] (inputs `key_cache_l`, `value_cache_l`), and `new_slots` [T, 1], the slot of each of the step's tokens.
 * Each array is also an output (`key_cache_l_out` = ScatterND(key_cache_l, new_slots, keys)) that the caller binds
 * to the very buffer it fed as the input: the WebGPU ScatterND then writes only the T new rows (it copies the
 * input first only when input and output are different buffers), so a step never touches the rest of the pool.
 *
 * Per-layer arrays rather than one pool because a device binds at most maxStorageBufferBindingSize bytes of one
 * buffer (128 MiB on lavapipe; reads past it return 0 and writes are dropped). One scatter index per token (a row
 * of kvHeads * headDim), never one per element: WebGPU's ScatterND checks indices for duplicates pairwise.
 *
 * Reads and writes within a step never touch the same slot: a step writes slots at positions >= each sequence's
 * startPos and reads only slots below it, and a block shared through the prefix cache is copied before a sequence
 * writes into it. So the in-place write may run before or after the reads.
 */
export function deviceKvCache(dtype: DTypeCode = DType.float) {
  return (g: GraphBuilder, cfg: LlamaConfig): KvCacheGraph => {
    const nkv = cfg.numKeyValueHeads;
    const hd = cfg.headDim;
    const kvDim = nkv * hd;
    const newSlots = g.input("new_slots", DType.int64, ["T", 1]);
    const arrays: string[][] = [];
    for (let l = 0; l < cfg.numHiddenLayers; l++) {
      arrays.push([keyCacheName(l), valueCacheName(l)].map((name) => g.input(name, dtype, ["slots", kvDim])));
    }
    return {
      readPast(layer, kv, pastSlots) {
        // [G, P, kvDim] -> [G, P, nkv, hd] -> head-major [nkv, G, P, hd]
        const rows = g.op("Gather", [arrays[layer][kv], pastSlots], { axis: 0 });
        return g.op("Transpose", [g.op("Reshape", [rows, g.ints([0, 0, nkv, hd])])], { perm: [2, 0, 1, 3] });
      },
      write(layer, k, v) {
        [k, v].forEach((x, kv) => {
          const name = `${arrays[layer][kv]}_out`;
          const rows = g.op("Squeeze", [x, g.ints([1])]); // [T, 1, kvDim] -> [T, kvDim]
          g.op("ScatterND", [arrays[layer][kv], newSlots, rows], {}, name);
          g.output(name, dtype, ["slots", kvDim]);
        });
      },
      finish() {},
    };
  };
}
