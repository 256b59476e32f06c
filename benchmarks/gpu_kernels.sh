#!/usr/bin/env bash
# The loss kernels on a GPU at paper scale: kernel tests, then bench_contrastive / bench_sigmoid / bench_dino.
#
#   bash benchmarks/gpu_kernels.sh                 # on a CUDA machine: results under benchmarks/results/gpu/
#   bash benchmarks/gpu_kernels.sh --tiny [DIR]    # anywhere: the same steps at tiny sizes on CPU, Triton under
#                                                  # TRITON_INTERPRET=1, results under DIR (default: a temp dir);
#                                                  # tests/test_gpu_kernels_script.py runs it this way
#   GPU_KERNELS_TESTS=0 bash benchmarks/gpu_kernels.sh ...   # skip the pytest step
#
# Paper scale (the fused-kernel issue): CLIP and SigLIP at B = 8192 .. 131072, D = 512, bf16 (the B x B
# implementations are expected to run out of memory at the top sizes: that is recorded as a row, not a failure);
# DINO with B = 64 .. 256 images per GPU, 2 + 8 crops, K = 65536. Budget: under 8 minutes on one H100/H200
# (tests ~1 min; each implementation is one process for all its sizes and modes, 3 timed repetitions).
# Needs torch with CUDA and triton; pytest for the tests and open_clip_torch for the peer rows are optional here
# (a step that lacks them says so and the rest still runs). fastenc is imported from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

TINY=0
if [[ "${1:-}" == "--tiny" ]]; then
    TINY=1
    OUT=${2:-$(mktemp -d -t fastenc_gpu_kernels.XXXXXX)}
    export TRITON_INTERPRET=1
    DEVICE=cpu
    CLIP_B=37; DIM=24; DINO_B=3; K=96; CROPS=4; DTYPE=fp32; REPS=1; MODES=fwd+bwd; ONE=--one-process
    IMPLS_CLIP=reference,chunked,triton; IMPLS_DINO=reference_loop,reference,chunked,triton
else
    OUT=${1:-benchmarks/results/gpu}
    DEVICE=cuda
    CLIP_B=8192,32768,65536,131072; DIM=512; DINO_B=64,128,256; K=65536; CROPS=10; DTYPE=bf16; REPS=3
    MODES=fwd,bwd,fwd+bwd; ONE=
    IMPLS_CLIP=reference,chunked,triton; IMPLS_DINO=reference_loop,reference,chunked,triton
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_kernels.sh: no CUDA device here; run with --tiny for the CPU interpreter check" >&2
        exit 2
    fi
fi
mkdir -p "$OUT"
PEER=""
if "$PY" -c "import open_clip" 2>/dev/null; then PEER="open_clip,"; else
    echo "gpu_kernels.sh: open_clip_torch not installed: the open_clip peer rows are skipped" >&2; fi
STATUS=0
START=$(date +%s)
stamp() { echo "[gpu_kernels +$(( $(date +%s) - START ))s] $*"; }

stamp "device=$DEVICE out=$OUT"
"$PY" - <<'EOF' | tee "$OUT/environment.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF

stamp "kernel tests"
if [[ "${GPU_KERNELS_TESTS:-1}" == "0" ]]; then
    echo "gpu_kernels.sh: GPU_KERNELS_TESTS=0: kernel tests skipped" | tee "$OUT/kernel_tests.txt"
elif "$PY" -c "import pytest" 2>/dev/null; then
    # On a GPU the Triton tests run on CUDA tensors (and the gpu-marked ones at larger shapes); with --tiny they
    # run under the interpreter. tests/losses covers every implementation against the references.
    "$PY" -m pytest tests/kernels tests/losses -q -m "gpu or not slow" -p no:cacheprovider \
        --junitxml "$OUT/kernel_tests.xml" 2>&1 | tail -n 15 | tee "$OUT/kernel_tests.txt"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || STATUS=1
else
    echo "gpu_kernels.sh: pytest not installed: kernel tests skipped" | tee "$OUT/kernel_tests.txt" >&2
fi

COMMON=(--device "$DEVICE" --dtype "$DTYPE" --reps "$REPS" --warmup 1 --modes "$MODES" --no-wait --timeout 600 $ONE)
stamp "bench_contrastive"
"$PY" benchmarks/bench_contrastive.py "${COMMON[@]}" --batch "$CLIP_B" --dim "$DIM" \
    --impls "${PEER}${IMPLS_CLIP}" --out "$OUT/bench_contrastive.csv" || STATUS=1
stamp "bench_sigmoid"
"$PY" benchmarks/bench_sigmoid.py "${COMMON[@]}" --batch "$CLIP_B" --dim "$DIM" \
    --impls "${PEER}${IMPLS_CLIP}" --out "$OUT/bench_sigmoid.csv" || STATUS=1
stamp "bench_dino"
"$PY" benchmarks/bench_dino.py "${COMMON[@]}" --batch "$DINO_B" --prototypes "$K" --crops "$CROPS" \
    --impls "$IMPLS_DINO" --out "$OUT/bench_dino.csv" || STATUS=1

# A benchmark row whose fast implementation failed is a failure of this script; the B x B implementations running
# out of memory at the largest sizes is expected and only reported.
"$PY" - "$OUT" <<'EOF' || STATUS=1
import csv, glob, os, sys
bad = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench_*.csv"))):
    for r in csv.DictReader(open(path)):
        if r.get("error"):
            expected = r["impl"] in ("open_clip", "reference", "reference_loop") and "out of memory" in r["error"]
            print(f"{os.path.basename(path)}: {r['impl']} {r['mode']} batch={r['batch']}: {r['error'][:120]}"
                  + ("  (expected: B x B logits)" if expected else ""))
            if not expected:
                bad.append(r)
sys.exit(1 if bad else 0)
EOF
stamp "done, status $STATUS; results in $OUT"
ls "$OUT"
exit $STATUS
