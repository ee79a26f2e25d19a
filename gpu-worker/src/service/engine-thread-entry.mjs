// Entry point of the engine thread. Node cannot load .ts by itself: a parent started through tsx hands its loader
// down through execArgv, but vitest's workers and plain node do not, so register tsx here, then load the thread.
import { register } from "tsx/esm/api";

register();
await import("./engine-thread.ts");
