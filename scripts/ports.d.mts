// Types of scripts/ports.mjs for the TypeScript tests that import it.
export declare function freePort(): Promise<number>;
export declare function portInUse(port: number): Promise<boolean>;
