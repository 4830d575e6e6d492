#!/usr/bin/env bash
# GPU check of the executor (issue 6), one prepared run on a CUDA machine, under 5 minutes.
#
#   bash bench/gpu_check.sh            # results in $OUT (default: ./gpu_check_out)
#
# 1. the GPU-marked tests of the executor (pytest -m gpu tests/test_executor.py);
# 2. the executor benchmark (python -m cachefit.bench.bench_executor --device cuda):
#    16 BF16 linear layers of 4096x4096 (32 MiB each), 16 BF16 layers of 2048x2048,
#    and GPT-2 at op granularity, every schedule, with and without the L2 window.
#
# Installs nothing and needs no ortools (the executor and the greedy solver never import it).
# cachefit is not installed there: a symlink shim maps the package-dir layout
# (cachefit/, graphs/, solvers/, instances/, executor/, bench/) onto one `cachefit`
# package on PYTHONPATH, and every command runs from the shim's folder so that the
# checkout's own cachefit/ folder is never imported as the package.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

SHIM="$(mktemp -d)"
mkdir -p "$SHIM/cachefit"
for entry in "$REPO"/cachefit/*; do
    [ "$(basename "$entry")" = "__pycache__" ] || ln -s "$entry" "$SHIM/cachefit/"
done
for sub in graphs solvers instances executor bench; do
    ln -s "$REPO/$sub" "$SHIM/cachefit/$sub"
done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$SHIM" || exit 2

status=0
echo "== environment" | tee "$OUT/env.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib.util, platform, sys
import torch
import cachefit, cachefit.executor
print("python", sys.version.split()[0], platform.platform())
print("cachefit from", cachefit.__file__)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "SMs", p.multi_processor_count, "L2", getattr(p, "L2_cache_size", "?"),
          "memory", p.total_memory)
for name in ("cuda.bindings", "ortools", "hypothesis"):
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    print(name, "present" if found else "absent")
if torch.cuda.is_available():
    try:
        torch.cuda.CUDAGraph(keep_graph=True)
        print("torch.cuda.CUDAGraph(keep_graph=True): supported")
    except TypeError as exc:
        print("torch.cuda.CUDAGraph(keep_graph=True): NOT supported:", exc)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "environment check failed"; exit 2; }

echo "== pytest -m gpu (executor)" | tee "$OUT/pytest_gpu.txt"
timeout 100 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --rootdir "$REPO" \
    "$REPO/tests/test_executor.py" 2>&1 | tee -a "$OUT/pytest_gpu.txt"
rc=${PIPESTATUS[0]}
echo "pytest exit code $rc" | tee -a "$OUT/pytest_gpu.txt"
[ "$rc" -eq 0 ] || status=1

echo "== executor benchmark (cuda)" | tee "$OUT/bench_log.txt"
timeout 170 "$PY" -m cachefit.bench.bench_executor --device cuda --suite gpu-check --l2 both \
    --json "$OUT/executor_gpu.json" --text "$OUT/executor_gpu.txt" 2>&1 | tee -a "$OUT/bench_log.txt"
rc=${PIPESTATUS[0]}
echo "benchmark exit code $rc" | tee -a "$OUT/bench_log.txt"
[ "$rc" -eq 0 ] || status=1

echo "== summary"
grep -E "^(stack32|stack8|gpt2)|target:|fastest passing|graph boundary|L2 persistence:|equivalence with" \
    "$OUT/bench_log.txt" || true
tail -n 3 "$OUT/pytest_gpu.txt"
rm -rf "$SHIM"
exit $status
