// Types of scripts/supervisor.mjs for the TypeScript tests that import it.
import type { ChildProcess } from "node:child_process";

export declare function hasExited(proc: ChildProcess): boolean;
export declare function exited(proc: ChildProcess): Promise<void>;
export declare function signalGroup(proc: ChildProcess, signal: NodeJS.Signals): void;
export declare function describeExit(code: number | null, signal: NodeJS.Signals | null): string;
export declare function stopProcess(proc: ChildProcess | undefined, timeoutMs: number): Promise<void>;

export interface ServiceSpec {
  start(): ChildProcess | Promise<ChildProcess>;
  ready?(proc: ChildProcess): Promise<unknown>;
  stage?: number;
  stopTimeoutMs?: number;
  onStart?(proc: ChildProcess): void;
}

export declare class Supervisor {
  constructor(opts?: { log?: (msg: string) => void });
  readonly stopping: boolean;
  add(name: string, spec: ServiceSpec): void;
  ready(name: string): Promise<void>;
  pid(name: string): number | undefined;
  stop(): Promise<void>;
  killAll(): void;
}
