#!/usr/bin/env bash
# Debian packages edgeprune's targets need: cross compilers for the ARM boards, qemu-user for emulated runs,
# arm-none-eabi for firmware, qemu-system-arm to boot it on an emulated Cortex-M7 board, cmake for C packages. Installs only what is missing (needs root or sudo).
set -euo pipefail
need=()
command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
command -v qemu-arm >/dev/null || need+=(qemu-user)
command -v arm-none-eabi-gcc >/dev/null || need+=(gcc-arm-none-eabi libnewlib-arm-none-eabi)
command -v qemu-system-arm >/dev/null || need+=(qemu-system-arm)
command -v cmake >/dev/null || need+=(cmake)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
