#!/usr/bin/env bash
# Makes sure the system packages the build and the tests need are present.
#
# - redis-server, redis-tools: every Redis test starts its own servers (standalone and cluster).
# - cc, make: librdkafka is built from source by Cargo.
# With the argument `extra` (the benches and the tansu run), also:
# - cmake, libcurl4-openssl-dev: the benches compare against sentry_arroyo, whose rdkafka
#   dependency turns on librdkafka's cmake build; that build needs the curl headers;
# - python3: the tansu script picks free ports with it.
#
# As root, missing packages are installed with apt-get. Otherwise the script names what to
# install and fails.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
if [ "${1:-}" = extra ]; then
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  [ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] \
    || missing+=(libcurl4-openssl-dev)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
fi
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v make >/dev/null 2>&1 || missing+=(make)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing missing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  exit 0
fi

echo "Missing system packages: ${missing[*]}" >&2
echo "Install them with: sudo apt-get install -y ${missing[*]}" >&2
exit 1
