#!/usr/bin/env bash
# Installs what the BullMQ peer benchmark in bench/gateway_bench.py needs, so `make bench` runs it in the
# same invocation: redis-server from Debian's `redis-server` package (7.0 on bookworm), and the harness's
# npm dependencies (`npm ci` from its package-lock.json). The harness lives outside the repo, by default
# in ../shared/bench/peers/bullmq next to the repo root; set BULLMQ_HARNESS to point elsewhere.
# Idempotent; called by `make bench-peers`. Quiet when everything is already there.
# Never fails: a peer that cannot be installed only means the bench skips it (and says why).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
harness="${BULLMQ_HARNESS:-$root/../shared/bench/peers/bullmq}"

say() { echo "install-peers: $*" >&2; }

if [ ! -d "$harness" ]; then
  say "no BullMQ harness at $harness; the BullMQ peer will be skipped"
  exit 0
fi

# Runs a command as root: directly when we are root, else through sudo without a password prompt.
as_root() {
  if [ "$(id -u)" = "0" ]; then
    "$@"
  else
    sudo -n "$@"
  fi
}

install_redis() {
  if [ "$(id -u)" != "0" ] && ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
    say "redis-server missing and no root (or password-less sudo); the BullMQ peer will be skipped." \
        "Install it with: sudo apt-get install -y --no-install-recommends redis-server"
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    say "redis-server missing and apt-get not found; install Redis 7 yourself to run the BullMQ peer"
    return 0
  fi
  # The package's postinst starts a Redis service on port 6379; the bench starts its own, so forbid it.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    if as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy"; then
      created_policy=1
    fi
  fi
  local log
  log="$(mktemp)"
  if ! as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y --no-install-recommends redis-server >"$log" 2>&1; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 || true
    if ! as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends redis-server >"$log" 2>&1; then
      say "apt-get install redis-server failed; the BullMQ peer will be skipped:"
      tail -n 5 "$log" >&2
    fi
  fi
  rm -f "$log"
  if [ "$created_policy" = 1 ]; then as_root rm -f "$policy"; fi
}

install_harness() {
  if ! command -v npm >/dev/null 2>&1; then
    say "npm not found; the BullMQ peer will be skipped (it needs Node 20 and npm)"
    return 0
  fi
  if [ ! -w "$harness" ]; then
    say "$harness is not writable, so 'npm ci' cannot run there; the BullMQ peer will be skipped"
    return 0
  fi
  local log
  log="$(mktemp)"
  if ! (cd "$harness" && npm ci --no-audit --no-fund --loglevel=error) >"$log" 2>&1; then
    # The shared harness's package-lock.json lacks the other platforms' optional msgpackr-extract entries,
    # which `npm ci` (npm >= 10) rejects as out of sync. `npm install --no-save` still installs the locked
    # versions and writes neither package.json nor the lock file.
    if ! grep -q 'package.json and package-lock.json' "$log" \
        || ! (cd "$harness" && npm install --no-save --no-audit --no-fund --loglevel=error) >"$log" 2>&1; then
      say "npm could not install the BullMQ harness in $harness; the BullMQ peer will be skipped:"
      grep -v '^npm warn' "$log" | tail -n 5 >&2
    fi
  fi
  rm -f "$log"
}

if ! command -v redis-server >/dev/null 2>&1; then
  install_redis
fi
if [ ! -d "$harness/node_modules/bullmq" ]; then
  install_harness
fi
exit 0
