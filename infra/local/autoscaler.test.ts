import { describe, expect, it } from "vitest";
import { desiredReplicas, readScalePolicy } from "./autoscaler.ts";

describe("local autoscaler policy", () => {
  it("reads the cluster ScaledObject's settings", () => {
    const p = readScalePolicy();
    expect(p).toMatchObject({ minReplicas: 1, maxReplicas: 8, lagThreshold: 32, pollingIntervalMs: 10_000 });
    expect(p.scaleDownWindowMs).toBe(300_000);
    expect(readScalePolicy(undefined, { maxReplicas: 2 }).maxReplicas).toBe(2);
  });

  it("asks for ceil(lag / threshold) workers within [min, max], zero only below activation", () => {
    const p = { ...readScalePolicy(), lagThreshold: 4, minReplicas: 0, maxReplicas: 3, activationLagThreshold: 0 };
    expect(desiredReplicas(0, p)).toBe(0);
    expect(desiredReplicas(1, p)).toBe(1);
    expect(desiredReplicas(4, p)).toBe(1);
    expect(desiredReplicas(5, p)).toBe(2);
    expect(desiredReplicas(100, p)).toBe(3);
    expect(desiredReplicas(0, { ...p, minReplicas: 1 })).toBe(1);
  });
});
