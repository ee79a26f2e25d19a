import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["{shared,gpu-worker,edge,test,infra}/**/*.test.ts"],
    exclude: ["**/node_modules/**"],
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // Two-core machines: model tests are CPU-bound, running files in parallel only adds contention.
    fileParallelism: false,
  },
});
