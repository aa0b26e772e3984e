#!/usr/bin/env bash
# On a GPU machine without a network: install the wheels scripts/gpu_wheels.sh put in .whl/ (into /tmp/site,
# ahead of the machine's own packages; torch stays the machine's), then run scripts/gpu_check.py within a
# budget. The table (gpu_check.md), every check's output (checks.log) and this script's own output
# (gpu_check.out) go to $OUT, or to /tmp/gpu_check_out. Back here:
#   python scripts/gpu_check.py --merge <that folder>/gpu_check.md     # into docs/benchmarks.md
# Arguments go to gpu_check.py (e.g. --only dpo,fsdp; --smoke runs the CPU sizes). BUDGET_S: seconds for all
# the checks (default 420, which leaves a 600-second command time for the install and the model build).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-/tmp/gpu_check_out}
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl > "$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 scripts/gpu_check.py --budget-s "${BUDGET_S:-420}" --out "$out/gpu_check.md" --log "$out/checks.log" \
    --work /tmp/gpu_check_work "$@" 2>&1 | tee "$out/gpu_check.out"
