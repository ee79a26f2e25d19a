// Entry point of the compile thread: register tsx (a worker thread does not inherit the parent's loader in every
// runner), then load the thread. Same pattern as service/engine-thread-entry.mjs.
import { register } from "tsx/esm/api";

register();
await import("./compile-thread.ts");
