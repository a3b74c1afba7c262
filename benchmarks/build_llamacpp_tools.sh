#!/usr/bin/env bash
# llama.cpp's imatrix and quantize command-line tools, for bench_gguf.py's imatrix rows. They are
# built from the llama.cpp sources that the llama-cpp-python 0.3.36 source package on PyPI ships
# (the same llama.cpp the GGUF tests run), with the same CPU flags as .ci/install_llamacpp.sh, into
# DIR/bin (default ~/.cache/hf_astroquant/llamacpp-tools). About 10 minutes on 2 cores.
# Usage: bash benchmarks/build_llamacpp_tools.sh [DIR]
set -euo pipefail
dir=${1:-$HOME/.cache/hf_astroquant/llamacpp-tools}
mkdir -p "$dir"
src="$dir/src"
if [ ! -d "$src/llama_cpp_python-0.3.36" ]; then
    pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$src"
    tar xzf "$src/llama_cpp_python-0.3.36.tar.gz" -C "$src"
fi
cmake -S "$src/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$dir/build" -j "$(nproc)" --target llama-imatrix llama-quantize >/dev/null
mkdir -p "$dir/bin"
cp "$dir/build/bin/llama-imatrix" "$dir/build/bin/llama-quantize" "$dir/bin/"
"$dir/bin/llama-quantize" --help 2>&1 | head -1 || true
echo "built $dir/bin/llama-imatrix and $dir/bin/llama-quantize"
