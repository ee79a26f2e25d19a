/**
 * The pools' numbers against what the worker accepts for the model they serve: the worker's own config parser and
 * KV sizing (ModelRunner.kvBytesPerToken, one KV array per layer), the gateway's context per pool, the container's
 * memory. A pool whose KV budget cannot hold the longest request the gateway routes to it, or overflows a typed
 * array, or does not fit its memory limit, would fail only at its first start in a cluster.
 *
 * The models' config.json files (architecture numbers only) are in infra/test/model-configs/, named after the repo.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseGatewayConfig } from "../../edge/src/config.ts";
import { ModelRunner } from "../../gpu-worker/src/engine/model-runner.ts";
import { parseLlamaConfig } from "../../gpu-worker/src/model/config.ts";
import { llamaWeightSpecs } from "../../gpu-worker/src/model/weights.ts";
import { hasKubectl, infraDir, k8sDir, kustomize } from "./k8s.ts";
import { poolNameOf, poolsOf, workerContainer } from "./pool.ts";
import { bytes } from "./quantity.ts";

const GiB = 1024 ** 3;
/** A typed array holds fewer than 2^32 elements. */
const MAX_TYPED_ARRAY_LENGTH = 2 ** 32 - 1;

function gatewayPools() {
  const text = readFileSync(join(infraDir, "cloudflare/wrangler.jsonc"), "utf8");
  const json = JSON.parse(text.replace(/^\s*\/\/.*$/gm, "").replace(/,(\s*[}\]])/g, "$1"));
  return parseGatewayConfig(json.vars.GATEWAY_CONFIG).pools;
}

describe.skipIf(!hasKubectl())("pool capacity (production overlay)", () => {
  const pools = hasKubectl() ? poolsOf(kustomize(join(k8sDir, "overlays/production"))) : [];
  const compiledBy = new Map(pools.flatMap((p) => (p.compile ? [[p.compile.LLAMA_COMPILE_OUT, p.compile]] : [])));

  it.each(pools.map((p) => [poolNameOf(p), p]))("pool %s: the worker accepts its numbers", (name, pool) => {
    const compile = compiledBy.get(pool.env.LLAMA_MODEL);
    expect(compile, `who compiles ${pool.env.LLAMA_MODEL}`).toBeDefined();
    const repo = (compile?.LLAMA_MODEL ?? "").split("@")[0];
    const file = join(infraDir, "test/model-configs", `${repo.replace("/", "--")}.json`);
    const cfg = parseLlamaConfig(JSON.parse(readFileSync(file, "utf8")), file);

    const env = pool.env;
    const requested = env.LLAMA_MAX_MODEL_LEN ? Number(env.LLAMA_MAX_MODEL_LEN) : cfg.maxPositionEmbeddings;
    expect(requested, `${name}: LLAMA_MAX_MODEL_LEN within the model's context`).toBeLessThanOrEqual(
      cfg.maxPositionEmbeddings,
    );
    const maxModelLen = Math.min(requested, cfg.maxPositionEmbeddings);
    const gateway = gatewayPools()[name];
    expect(gateway, `${name} in GATEWAY_CONFIG`).toBeDefined();
    expect(
      gateway?.max_context,
      `${name}: the gateway routes no longer request than the worker serves`,
    ).toBeLessThanOrEqual(maxModelLen);

    // The KV pool as the engine sizes it: whole blocks of the budget, one array per layer.
    const blockSize = Number(env.LLAMA_BLOCK_SIZE ?? 16);
    const kvBytes = Number(env.LLAMA_KV_CACHE_BYTES);
    expect(kvBytes, `${name}: LLAMA_KV_CACHE_BYTES`).toBeGreaterThan(0);
    const numBlocks = Math.floor(kvBytes / (ModelRunner.kvBytesPerToken(cfg) * blockSize));
    const poolTokens = numBlocks * blockSize;
    expect(poolTokens, `${name}: the KV pool holds the longest request routed here`).toBeGreaterThanOrEqual(
      gateway?.max_context ?? Number.POSITIVE_INFINITY,
    );
    const perLayerElements = 2 * cfg.numKeyValueHeads * poolTokens * cfg.headDim;
    expect(perLayerElements, `${name}: one layer's KV array`).toBeLessThanOrEqual(MAX_TYPED_ARRAY_LENGTH);
    expect(Number(env.LLAMA_MAX_NUM_BATCHED_TOKENS ?? 512)).toBeGreaterThanOrEqual(blockSize);

    // Host memory: the KV pool and the weights (f32 at most) with room for the process.
    const params = llamaWeightSpecs(cfg).reduce((n, s) => n + s.shape.reduce((a, b) => a * b, 1), 0);
    const limit = bytes(workerContainer(pool).resources.limits.memory);
    expect(limit, `${name}: memory limit vs KV ${kvBytes / GiB} GiB + weights`).toBeGreaterThanOrEqual(
      kvBytes + params * 4 + 4 * GiB,
    );
  });
});
