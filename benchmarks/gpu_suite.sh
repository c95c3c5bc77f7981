#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one run, for one machine with a CUDA GPU:
#   bash benchmarks/gpu_suite.sh [--quick] [OUT_DIR]
# Runs the tests marked `gpu`, then the benchmarks (ours vs flash-linear-attention where it is
# installed, onnxruntime CUDA where onnxruntime-gpu is installed). Results: OUT_DIR/results.tgz
# (JSON + markdown of each benchmark, the test log) and the markdown tables on stdout.
# --quick: the chunk kernels' and the model's GPU tests, and bench_ops.py at the headline shape only
# (on an H100 the chunk tests took ~2 minutes and bench_ops.py --quick ~3.5).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
out="${1:-${OUT:-bench-out}}"
work="$(mktemp -d)"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
run() {  # run NAME CMD...: log to $work/NAME.log, remember failures, keep going
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$work/$name.log" | tail -n 40
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "!! $name exited $rc"; status=1; }
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$work/card.txt"
if [ "$quick" = 1 ]; then
    run gpu_tests python3 -m pytest -m gpu -q -rs --durations=15 tests/test_kernels_chunk.py tests/test_gpu_model.py
    run bench_ops python3 benchmarks/bench_ops.py --quick --out "$work"
    tar czf "$out/results.tgz" -C "$work" .
    cat "$work"/*.md 2>/dev/null
    exit $status
fi
run gpu_tests python3 -m pytest -m gpu -q -rs --durations=15 tests/
run bench_ops python3 benchmarks/bench_ops.py --out "$work"
run bench_cg_relax python3 benchmarks/bench_cg_relax.py --out "$work"
run bench_passes python3 benchmarks/bench_passes.py --out "$work"
run bench_decode python3 benchmarks/bench_decode.py --out "$work"
run bench_train_step python3 benchmarks/bench_train_step.py --out "$work"
if python3 -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" 2>/dev/null; then
    run bench_ort_decode python3 benchmarks/bench_ort_decode.py --out-json "$work/ort_decode.json" \
        --out-md "$work/ort_decode.md"
else
    echo "== onnxruntime-gpu not installed: onnxruntime CUDA benchmark not run"
fi
tar czf "$out/results.tgz" -C "$work" .
for md in "$work"/*.md; do echo; echo "## $(basename "$md")"; cat "$md"; done
exit $status
