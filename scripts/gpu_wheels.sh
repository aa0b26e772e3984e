#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels that a GPU machine without a network needs to run
# scripts/gpu_check.py: a machine whose image holds Python 3.12, a CUDA torch, transformers, accelerate, peft,
# tokenizers, safetensors, numpy, pandas, pyarrow and the usual libraries, but not Hydra, datasets or DeepSpeed.
# prefrun's own pins are carried too (transformers, accelerate, peft), so the GPU runs the versions CI tests;
# torch is the machine's own. Run it here, where pip reaches a package index; scripts/gpu_check.sh installs them
# there. vLLM cannot travel this way (its CUDA wheel is ~400 MB and pins its own torch): without it, the checks
# that need an engine use HF generation, and their rows say so.
#
#   scripts/gpu_wheels.sh            # then carry .whl to the machine and run scripts/gpu_check.sh there
#   PYTHON_VERSION=3.11 scripts/gpu_wheels.sh   # for a machine with another Python
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
version=${PYTHON_VERSION:-3.12}
rm -rf .whl && mkdir -p .whl
version_of() { "$python" -c "from importlib.metadata import version; print(version('$1'))"; }
# The versions installed here (what the test suite ran against), pure-Python wheels or built for $version.
pinned=()
for name in hydra-core omegaconf antlr4-python3-runtime datasets dill multiprocess transformers accelerate peft \
            hjson pydantic pydantic-core annotated-types typing-inspection; do
    pinned+=("$name==$(version_of "$name")")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# antlr4 4.9.3 (Hydra's pin) is published as a source distribution only: built here, like DeepSpeed (which
# builds no CUDA ops until it runs: a pure-Python wheel).
built=()
wheels=()
for spec in "${pinned[@]}"; do
    case $spec in antlr4-python3-runtime==*) built+=("$spec") ;; *) wheels+=("$spec") ;; esac
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
"$python" -m pip wheel -q --no-deps --no-build-isolation -w .whl "${built[@]}" "deepspeed==$(version_of deepspeed)"
if commit=$(git rev-parse --short HEAD 2>/dev/null); then  # gpu_check.py's table names it (git does not travel)
    git diff --quiet HEAD || commit="$commit (with uncommitted changes)"
    echo "$commit" > .whl/COMMIT
fi
du -sh .whl
ls .whl
