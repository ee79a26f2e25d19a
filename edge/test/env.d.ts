// Types for the tests: `env` and `exports` from "cloudflare:workers", and what global-setup.ts provides.
import type { Env as GatewayEnv } from "../src/env.ts";

declare global {
  namespace Cloudflare {
    interface Env extends GatewayEnv {}
    interface GlobalProps {
      /** `exports.default` is the Workers entry (src/index.ts), called as a client would. */
      mainModule: typeof import("../src/index.ts");
      durableNamespaces: "KeyState" | "KeyDirectory" | "DispatchShard" | "RequestCounters";
    }
  }
}

declare module "vitest" {
  export interface ProvidedContext {
    /** ws:// URL of the nats-server started by test/global-setup.ts. */
    natsWsUrl: string;
    natsUrl: string;
  }
}
