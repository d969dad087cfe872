#!/usr/bin/env bash
# Set up bdsafety on a fresh Debian/Ubuntu machine: the Fashion-MNIST package (if missing), a venv in
# .venv with the CPU build of torch, and bdsafety itself (editable, with the test, ray and docs extras: the test
# suite runs the ray executor and builds the documentation site with `mkdocs build --strict`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${BDSAFETY_DATA:-}" ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,ray,docs]"
