# syntax=docker/dockerfile:1
#
# The GPU worker (`llama-worker serve`) on ONNX Runtime's CPU provider: for trying a pool on machines without a
# GPU, CI, and the local stack in a container. The CUDA image is worker-cuda.Dockerfile.
#
#   docker build -f infra/docker/worker.Dockerfile -t llama-edge/worker:0.1.0 .      (from the repository root)
#   docker run --rm -v /path/to/models:/models:ro -e LLAMA_MODEL=/models/llama-2-7b-chat-hf \
#     -e NATS_URL=nats://host.docker.internal:4222 llama-edge/worker:0.1.0
#
# The TypeScript sources run through tsx (a dependency of gpu-worker), as on a developer's machine: no build step.
# worker.Dockerfile.dockerignore (beside this file; BuildKit reads it) sends only what the worker needs.

ARG NODE_IMAGE=node:20-bookworm-slim
FROM ${NODE_IMAGE}

WORKDIR /app

# Dependencies first, so that a source change does not reinstall them. npm ci checks the lockfile against every
# workspace's package.json, hence all of them; only gpu-worker's production dependencies (and the shared workspace
# it links to) are installed. onnxruntime-node ships its CPU binaries in the package: skip its download step
# (which would fetch the CUDA provider from NuGet on linux/x64).
COPY package.json package-lock.json ./
COPY shared/package.json shared/
COPY gpu-worker/package.json gpu-worker/
COPY edge/package.json edge/
COPY console/package.json console/
COPY test/package.json test/
COPY infra/package.json infra/
RUN ONNXRUNTIME_NODE_INSTALL=skip npm ci --omit=dev --workspace @llama-edge/gpu-worker --no-audit --no-fund \
 && npm cache clean --force \
 && rm -rf node_modules/onnxruntime-node/bin/napi-v6/darwin node_modules/onnxruntime-node/bin/napi-v6/win32

COPY shared/ shared/
COPY gpu-worker/ gpu-worker/

# The worker writes compiled weights under LLAMA_EDGE_CACHE_DIR (mount a volume there) and tsx its transpile cache
# under /tmp; everything else can be read-only. uid 1000 is the image's `node` user (the pod spec runs as 1000).
ENV NODE_ENV=production \
    LLAMA_EDGE_CACHE_DIR=/cache \
    LLAMA_DEVICE=cpu \
    LLAMA_HEALTH_PORT=8080
RUN mkdir -p /cache && chown node:node /cache
USER node
EXPOSE 8080
# SIGTERM goes straight to node (exec form, PID 1), which drains and exits 0.
ENTRYPOINT ["node", "gpu-worker/bin/llama-worker.js"]
CMD ["serve"]
