#!/usr/bin/env bash
# Installs Mesa's lavapipe Vulkan driver (a CPU implementation), on which ONNX Runtime's WebGPU provider runs where
# there is no GPU: the WebGPU backend's tests use it. Debian 12 (bookworm) ships Mesa 22.3, which lacks features
# Dawn requires ("shaderUniform*ArrayDynamicIndexing required"), so Mesa comes from bookworm-backports.
set -euo pipefail
icd=/usr/share/vulkan/icd.d/lvp_icd.json
if [ -f "$icd" ] && dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q '^2[5-9]\.'; then
  exit 0
fi
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != "bookworm" ] || [ "$(id -u)" != 0 ]; then
  echo "lavapipe: install Mesa >= 25 (mesa-vulkan-drivers) yourself; this script handles Debian 12 as root" >&2
  exit 1
fi
cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null
echo "lavapipe: installed mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)"
