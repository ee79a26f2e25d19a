/**
 * The worker's HTTP endpoints for Kubernetes and Prometheus:
 *   /healthz  liveness: 200 while the process and its engine thread are alive
 *   /readyz   readiness: 200 once the model is loaded and NATS is connected, 503 before, while reconnecting and
 *             while draining
 *   /metrics  Prometheus text format
 *
 * @module
 */
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import type { Registry } from "prom-client";

export interface HealthChecks {
  live(): boolean;
  /** null when ready, else the reason. */
  notReadyReason(): string | null;
  registry(): Registry | null;
}

export interface HealthServer {
  port: number;
  close(): Promise<void>;
}

export async function startHealthServer(port: number, checks: HealthChecks, host = "0.0.0.0"): Promise<HealthServer> {
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    const reply = (status: number, body: string, type = "text/plain; charset=utf-8") => {
      res.writeHead(status, { "content-type": type });
      res.end(body);
    };
    if (req.method !== "GET" && req.method !== "HEAD") return reply(405, "method not allowed\n");
    if (path === "/healthz") return checks.live() ? reply(200, "ok\n") : reply(500, "engine thread is gone\n");
    if (path === "/readyz") {
      const reason = checks.notReadyReason();
      return reason === null ? reply(200, "ready\n") : reply(503, `${reason}\n`);
    }
    if (path === "/metrics") {
      const registry = checks.registry();
      if (!registry) return reply(503, "starting\n");
      registry.metrics().then(
        (text) => reply(200, text, registry.contentType),
        (e: Error) => reply(500, `${e.message}\n`),
      );
      return;
    }
    reply(404, "not found\n");
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, resolve);
  });
  return {
    port: (server.address() as AddressInfo).port,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}
