// Types of scripts/nats.mjs for the TypeScript tests that import it.
import type { ChildProcess } from "node:child_process";

export declare const defaultPorts: Readonly<{ port: number; wsPort: number; httpPort: number }>;
export declare function findNatsServer(): string | null;
export declare function natsServerVersion(bin: string): [number, number, number] | null;
export declare function ensureNatsServer(): string;
export interface NatsConfigOptions {
  dir: string;
  port: number;
  wsPort: number;
  httpPort: number;
  storeDir: string;
  maxPayload?: number;
}
export declare function writeNatsConfig(o: NatsConfigOptions): string;
export declare function chooseNatsPorts(preferred?: {
  port: number;
  wsPort: number;
  httpPort: number;
}): Promise<{ port: number; wsPort: number; httpPort: number; taken: number[] }>;
export declare function preferredNatsPorts(env?: Record<string, string | undefined>): {
  port: number;
  wsPort: number;
  httpPort: number;
};
export declare function spawnNatsServer(
  o: NatsConfigOptions & { detached?: boolean; stdio?: "inherit" | "ignore" | "pipe" },
): { proc: ChildProcess; configFile: string };
export declare function waitForNats(httpPort: number, timeoutMs?: number, proc?: ChildProcess): Promise<void>;

export interface NatsHandle {
  proc: ChildProcess;
  url: string;
  wsUrl: string;
  port: number;
  wsPort: number;
  httpPort: number;
  storeDir: string;
  configFile: string;
  stop(): Promise<void>;
}
export declare function startNats(opts?: {
  dir?: string;
  port?: number;
  wsPort?: number;
  httpPort?: number;
  storeDir?: string;
  maxPayload?: number;
  detached?: boolean;
  stdio?: "inherit" | "ignore" | "pipe";
}): Promise<NatsHandle>;
