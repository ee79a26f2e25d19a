# syntax=docker/dockerfile:1
#
# The GPU worker on ONNX Runtime's WebGPU provider (`llama-worker serve --device webgpu`), the recommended backend on
# GPU hosts: the weights and the paged KV cache stay in GPU memory, and a step moves only its small inputs and the
# sampler's results (with --device cuda, onnxruntime-node copies the whole KV pool to the GPU on every step).
#
#   docker build -f infra/docker/worker-webgpu.Dockerfile -t registry.example.com/llama-edge/worker-webgpu:0.1.0 .
#
# What the GPU needs. onnxruntime-node's Linux build bundles the WebGPU provider (Dawn), which drives the GPU through
# Vulkan: the image carries the Vulkan loader (libvulkan1) and nothing of CUDA. The driver's Vulkan ICD comes from the
# host: on NVIDIA nodes the container toolkit mounts it (libGLX_nvidia, nvidia_icd.json) only when
# NVIDIA_DRIVER_CAPABILITIES includes `graphics` (the usual `compute,utility` is not enough: the worker then fails
# its start with "webgpu: no usable GPU adapter"). Nodes need the NVIDIA driver and device plugin as for CUDA.
#
# No CPU Vulkan driver (Mesa's lavapipe) is installed on purpose: on a node whose GPU is not exposed the worker
# fails loudly instead of running 100x slower on the CPU.

ARG NODE_IMAGE=node:20-bookworm-slim
FROM ${NODE_IMAGE}

WORKDIR /app

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libvulkan1 \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first (see worker.Dockerfile): every workspace's package.json for npm ci, gpu-worker's production
# dependencies only; onnxruntime-node's download step would fetch the CUDA provider, which this image does not use.
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

ENV NODE_ENV=production \
    LLAMA_EDGE_CACHE_DIR=/cache \
    LLAMA_DEVICE=webgpu \
    LLAMA_HEALTH_PORT=8080 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics
RUN mkdir -p /cache && chown node:node /cache
USER node
EXPOSE 8080
ENTRYPOINT ["node", "gpu-worker/bin/llama-worker.js"]
CMD ["serve"]
