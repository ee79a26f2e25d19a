// The edge's tests run inside workerd (@cloudflare/vitest-pool-workers, published as @cloudflare/vitest-plugin from
// v1, which needs Node 22): Durable Objects, RPC streams and Web APIs behave as in production. A nats-server with
// a WebSocket listener is started for them by test/global-setup.ts.
import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

export default defineConfig({
  plugins: [
    cloudflareTest(({ inject }) => ({
      wrangler: { configPath: "./wrangler.jsonc" },
      miniflare: {
        bindings: {
          ADMIN_SECRET: "test-admin-secret-0123456789",
          NATS_URL: inject("natsWsUrl"),
          DISPATCH_SHARDS: "2",
        },
      },
    })),
  ],
  test: {
    name: "edge",
    root: import.meta.dirname,
    include: ["src/**/*.test.ts", "test/**/*.test.ts"],
    globalSetup: ["./test/global-setup.ts"],
    testTimeout: 30_000,
  },
});
