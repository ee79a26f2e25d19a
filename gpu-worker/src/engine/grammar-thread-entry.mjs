// Entry point of the grammar thread (see grammar-worker.ts); registers tsx first, as engine-thread-entry.mjs does.
import { register } from "tsx/esm/api";

register();
await import("./grammar-thread.ts");
