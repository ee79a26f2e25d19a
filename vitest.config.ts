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
          exclude: ["**/node_modules/**", "test/chaos/**"],
        },
      },
      // The reliability suite (`npm run test:chaos`): one `npm start` stack, broken on purpose in every way the
      // README's reliability table lists.
      {
        extends: true,
        test: {
          name: "chaos",
          include: ["test/chaos/**/*.test.ts"],
          globalSetup: ["test/chaos/stack-setup.ts"],
          // One retry per scenario: on a 2-core runner the stack and its clients share the CPU (README, Reliability).
          retry: 1,
        },
      },
      // The gateway's own tests run inside workerd (Durable Objects, RPC streams): see edge/vitest.config.ts.
      "./edge/vitest.config.ts",
    ],
  },
});
