import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // Two-core machines: model tests are CPU-bound, running files in parallel only adds contention.
    fileParallelism: false,
    projects: [
      {
        extends: true,
        test: {
          name: "node",
          include: ["{shared,gpu-worker,test,infra}/**/*.test.ts"],
          exclude: ["**/node_modules/**"],
        },
      },
      // The gateway's own tests run inside workerd (Durable Objects, RPC streams): see edge/vitest.config.ts.
      "./edge/vitest.config.ts",
    ],
  },
});
