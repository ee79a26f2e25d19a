# syntax=docker/dockerfile:1
#
# The GPU worker (`llama-worker serve --device cuda`) on NVIDIA GPUs: CUDA 12 runtime with cuDNN 9, Node 20, and
# onnxruntime-node with its CUDA execution provider.
#
#   docker build -f infra/docker/worker-cuda.Dockerfile -t registry.example.com/llama-edge/worker-cuda:0.1.0 .
#
# Nodes need the NVIDIA driver (>= 525 for CUDA 12; 570+ for 12.8 without the compat package) and the NVIDIA
# device plugin, which advertises `nvidia.com/gpu` to the scheduler.
#
# How the CUDA provider gets in. onnxruntime-node bundles the CPU binaries only; its install script
# (node_modules/onnxruntime-node/script/install.js) downloads libonnxruntime_providers_{cuda,shared,tensorrt}.so
# for linux/x64 from NuGet (package Microsoft.ML.OnnxRuntime.Gpu.Linux, same version as onnxruntime-node) into
# node_modules/onnxruntime-node/bin/napi-v6/linux/x64/. It reads ONNXRUNTIME_NODE_INSTALL (or the npm flag
# --onnxruntime-node-install): `skip` skips it, `true`/`1` forces the platform's default manifest (cuda12 on
# linux/x64), unset downloads only if the files are missing. Its comments also mention the value `cuda12`, but in
# onnxruntime-node 1.30.0 that value is not returned by the flag parser and silently means "unset" (and the older
# ONNXRUNTIME_NODE_INSTALL_CUDA=v12 is deprecated): we install with `skip`, run the script once with `true`, and
# fail the build if the provider is not there. The build stage needs network access to api.nuget.org.

ARG NODE_IMAGE=node:20-bookworm-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${NODE_IMAGE} AS build
WORKDIR /app
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
RUN ONNXRUNTIME_NODE_INSTALL=true node node_modules/onnxruntime-node/script/install.js \
 && test -f node_modules/onnxruntime-node/bin/napi-v6/linux/x64/libonnxruntime_providers_cuda.so \
 && test -f node_modules/onnxruntime-node/bin/napi-v6/linux/x64/libonnxruntime_providers_shared.so
COPY shared/ shared/
COPY gpu-worker/ gpu-worker/

FROM ${CUDA_IMAGE}
# Node from the official image: same binary as the build stage (glibc 2.36 there, 2.39 here), no extra apt source.
COPY --from=build /usr/local/bin/node /usr/local/bin/node
WORKDIR /app
COPY --from=build /app /app
ENV NODE_ENV=production \
    LLAMA_EDGE_CACHE_DIR=/cache \
    LLAMA_DEVICE=cuda \
    LLAMA_HEALTH_PORT=8080
# uid 1000 (the pod spec runs as 1000; Ubuntu 24.04 images name it `ubuntu`).
RUN mkdir -p /cache && chown 1000:1000 /cache
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["node", "gpu-worker/bin/llama-worker.js"]
CMD ["serve"]
