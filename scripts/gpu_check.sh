#!/usr/bin/env bash
# Every GPU check of hf_slim in one run on a fresh GPU machine (about 8 minutes on one H200), logs under $OUT.
#
# Why one script: a lent GPU comes for minutes, bare, with its own python3 (torch, transformers in the tested range,
# triton, accelerate, pytest; see ../shared/GPU.md); each step below runs under its own time limit, in order of what
# a failure would cost users (a crash first, then wrong output, then speed), so a slow step never hides an earlier one.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh            # from the repository root, on the GPU machine
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh       # the checks without the benchmarks (about 3 minutes)
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh    # a dry run of the same steps on the CPU at small shapes, to
#                                                     # prove the script before spending device time on it
#
# Steps (log file under $OUT):
#   1. check_device.log   every supported model type with the model on CUDA: slimify in each mode (calibration
#                         included), greedy/static/beam generate, save/load_slim (scripts/check_device.py)
#   2. kernel_tests.log   the Triton kernel and its integration tests on the GPU (tests/test_kernel*.py)
#   3. bench_generate.log issue 26's table: generate() end to end, slim vs unpatched, with tokens/s at equal memory
#   4. bench_attention.log the attention op alone, kernel vs PyTorch vs SDPA, CUDA graphs
# The exit status is the first failing step's; summary.txt lists each step's status and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # wheels fetched by scripts/device_wheels.sh for a machine without a package registry
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

status=0
summary="$OUT/summary.txt"
: > "$summary"

# step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to $OUT/NAME.log and the terminal
step() {
    local name="$1" limit="$2"
    shift 2
    local started=$SECONDS
    echo "== $name: $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    printf '%-16s exit %-3s %4d s\n' "$name" "$rc" $((SECONDS - started)) | tee -a "$summary"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
python3 -c "import platform, torch, transformers; print(torch.cuda.get_device_name() if torch.cuda.is_available() \
else platform.machine(), 'torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 \
    | tee "$OUT/versions.txt"
step check_device 150 python3 scripts/check_device.py --device "$DEVICE"
step kernel_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernel.py tests/test_kernel_integration.py
if [ -z "${GPU_CHECK_QUICK:-}" ]; then
    if [ "$DEVICE" = cuda ]; then
        step bench_generate 200 python3 scripts/bench_generate.py --repeats 2 --equal-memory llama-7b whisper-lv3-b64
        step bench_attention 60 python3 scripts/bench_attention.py --check --graph --seqs 1024 4096 16384
    else  # the attention op benchmark needs CUDA (triton's do_bench)
        step bench_generate 200 python3 scripts/bench_generate.py --small --device cpu --cases whisper-lv3-b1 gpt2-xl
    fi
fi
echo "== summary"
cat "$summary"
exit "$status"
