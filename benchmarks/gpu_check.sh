#!/usr/bin/env bash
# The GPU check, as one short run on a lent GPU machine (the device tool): what the project proves
# there, in about 10 minutes of device time. Build the carry first (`bash ../shared/device/make-carry.sh`),
# then run with carry [".gpu"] and the command `bash benchmarks/gpu_check.sh`; its output lands in $OUT.
#   1. the machine: GPU, driver, torch build
#   2. oelm-ray selftest --local: every fast-path check on this GPU (at most ~3 min)
#   3. benchmarks/gpu_speed.py: the trainer against the model-step ceiling at Medium-512 batch 8
#   4. the CUDA test: compiled run through an unfreeze, background checkpoints, kill-and-resume
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site OELM_GPT2_RANKS=$PWD/.gpu/gpt2.tiktoken RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 WANDB_MODE=disabled
step() { echo; echo "== $1"; }
step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'capability', torch.cuda.get_device_capability())"
step "selftest"
timeout 300 python3 -m oelm_ray selftest --local 2>&1 | tee "$OUT/selftest.txt"
step "gpu_speed"
timeout 330 python3 benchmarks/gpu_speed.py 2>&1 | tee "$OUT/gpu_speed.txt"
step "CUDA test"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_speed.py -k cuda 2>&1 | tail -15 | tee "$OUT/cuda_test.txt"
