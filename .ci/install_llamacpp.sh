#!/usr/bin/env bash
# llama.cpp, through llama-cpp-python (PyPI ships only its source: it builds llama.cpp with this
# machine's cmake and gcc, about 10 minutes on 2 cores), in its own virtual environment, for the
# GGUF tests (tests/test_gguf_writer.py, tests/test_gguf_export.py, integration_tests/test_gguf_smollm2.py)
# and benchmarks/bench_gguf.py. The build targets AVX2 + FMA + F16C whatever this CPU has beyond that
# (GGML_NATIVE=OFF), so every machine runs the same kernels and rounds the same way; no curl, no server.
# Usage: bash .ci/install_llamacpp.sh ENV_DIR
set -euo pipefail
env_dir=${1:?usage: install_llamacpp.sh ENV_DIR}
python -m venv "$env_dir"
"$env_dir/bin/pip" install -q numpy
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$env_dir/bin/pip" install -q llama-cpp-python==0.3.36
"$env_dir/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
