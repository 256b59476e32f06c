#!/usr/bin/env bash
# The data pipelines on a GPU machine: DALI on the GPU (nvJPEG "mixed" decoding, GPU augmentation, batches as CUDA
# tensors) against fastenc's torch path (PIL + torchvision in DataLoader workers, batches copied to the GPU), for the
# CLIP transform and DINO multi-crop, with benchmarks/bench_dataloader.py --device gpu.
#
#   bash benchmarks/gpu_data.sh            # rows appended to benchmarks/results/bench_dataloader.csv, PNG redrawn
#
# Cases (one fresh process each): dali-gpu at T = 4 and 8 threads, torch at T = 8 and 16 workers (open_clip's own
# pipeline too when open_clip_torch is importable), batch 256, 224 px (DINO: 2 x 224 + 10 x 96 px crops) from
# 448 px synthetic JPEGs. Rows carry the GPU's name (harness `gpu` column) and device=gpu.
#
# Environment (all optional):
#   WHEELS_DIR   wheels to install nvidia-dali-cuda130, numba, webdataset, braceexpand (and their dependencies:
#                nvidia-nvimgcodec-cu13, nvidia-libnvcomp-cu13, llvmlite, astunparse, gast, optree, nvtx, makefun,
#                libcst, six, packaging, numpy, pyyaml) from when `import nvidia.dali` fails; default shared/wheels,
#                else benchmarks/wheels. Nothing is fetched from the network.
#   PY           python (default: python)
#   SAMPLES      synthetic samples (default 32000: each DALI epoch rebuilds its pipeline, so an epoch should last
#                several seconds at GPU rates); SAMPLES_PER_SHARD (default 1000)
#   WINDOW       measured seconds per case (default 10); BATCH (default 256)
#   DALI_THREADS (default "4,8"), TORCH_WORKERS (default "8,16"), TRANSFORMS (default "clip,dino")
#   RESULTS_DIR  (default benchmarks/results); DATA_DIR (default: bench_dataloader.py's, under the temp dir)
# Budget: about 5-6 minutes on one H200 with 16 cores (wheel install ~0.5 min, 32k shards ~0.5-1 min, ~8 cases of
# ~25 s each).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
stamp() { echo "[gpu_data +$(( $(date +%s) - START ))s] $*"; }
fail() { echo "gpu_data.sh: ERROR: $*" >&2; exit 2; }

SAMPLES=${SAMPLES:-32000}
SAMPLES_PER_SHARD=${SAMPLES_PER_SHARD:-1000}
WINDOW=${WINDOW:-10}
BATCH=${BATCH:-256}
DALI_THREADS=${DALI_THREADS:-4,8}
TORCH_WORKERS=${TORCH_WORKERS:-8,16}
TRANSFORMS=${TRANSFORMS:-clip,dino}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
DATA_ARGS=()
[[ -n "${DATA_DIR:-}" ]] && DATA_ARGS=(--data-dir "$DATA_DIR")

# 1. A GPU, or stop here.
"$PY" -c "import torch" 2>/dev/null || fail "'$PY' cannot import torch"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() else 1)"; then
    nvidia-smi -L >&2 2>/dev/null || echo "(nvidia-smi not available)" >&2
    TORCH_INFO=$("$PY" -c 'import torch; print(torch.__version__, "CUDA build", torch.version.cuda)')
    fail "no CUDA GPU visible to torch ($TORCH_INFO, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset});" \
        "this script needs one. For the CPU benchmark run: python benchmarks/bench_dataloader.py"
fi
GPU_INFO=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__,
                                          "CUDA", torch.version.cuda)')
stamp "GPU: $GPU_INFO"

# 2. DALI, numba, webdataset, braceexpand from the carried wheels when missing.
if ! "$PY" -c "import nvidia.dali, numba, webdataset, braceexpand" 2>/dev/null; then
    if [[ -z "${WHEELS_DIR:-}" ]]; then
        for d in shared/wheels benchmarks/wheels; do
            if [[ -d "$d" ]]; then WHEELS_DIR=$d; break; fi
        done
    fi
    if [[ -z "${WHEELS_DIR:-}" || ! -d "$WHEELS_DIR" ]]; then
        PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        fail "nvidia.dali / numba / webdataset / braceexpand do not import and no wheel folder was found" \
            "(WHEELS_DIR=${WHEELS_DIR:-unset}; looked in shared/wheels and benchmarks/wheels). Prepare one on a" \
            "Linux x86_64 machine with Python $PYVER and network access: pip download -d shared/wheels" \
            "nvidia-dali-cuda130==2.4.0 numba==0.68.1 webdataset==1.0.2 braceexpand"
    fi
    stamp "installing nvidia-dali-cuda130 numba webdataset braceexpand from $WHEELS_DIR"
    "$PY" -m pip install --no-index --find-links "$WHEELS_DIR" nvidia-dali-cuda130 numba webdataset braceexpand \
        || fail "pip could not install the data packages from $WHEELS_DIR (a dependency wheel missing? see above)"
    # The PNG needs matplotlib; install it too if its wheel was carried (the CSV rows do not need it).
    "$PY" -c "import matplotlib" 2>/dev/null || \
        "$PY" -m pip install -q --no-index --find-links "$WHEELS_DIR" matplotlib 2>/dev/null || \
        echo "gpu_data.sh: matplotlib not installed: the PNG is not drawn here (redraw it with --summarize)" >&2
fi
"$PY" -c "import nvidia.dali, numba, webdataset" || fail "the data packages still do not import"

# 3. fastenc itself: from this checkout (PYTHONPATH); installed without dependencies only if that fails.
if ! "$PY" -c "import fastenc.data.dali" 2>/dev/null; then
    stamp "installing fastenc (no dependencies, no native extension)"
    FASTENC_NO_NATIVE=1 "$PY" -m pip install --no-deps --no-build-isolation -e . || fail "pip install -e . failed"
    "$PY" -c "import fastenc.data.dali" || fail "fastenc.data.dali does not import (a missing dependency? see above)"
fi

# 4. The benchmark. DALI on the GPU, then the torch path (and open_clip's pipeline if present) on the same shards.
COMMON=(--device gpu --transforms "$TRANSFORMS" --batch-size "$BATCH" --window "$WINDOW" --samples "$SAMPLES"
        --samples-per-shard "$SAMPLES_PER_SHARD" --results-dir "$RESULTS_DIR" --gen-workers "$(nproc)"
        --wait-idle 0 --retries 0 --timeout 300 "${DATA_ARGS[@]}")
STATUS=0
stamp "dali-gpu, threads $DALI_THREADS"
"$PY" benchmarks/bench_dataloader.py "${COMMON[@]}" --backends dali-gpu --threads "$DALI_THREADS" || STATUS=1
PEERS=torch
if "$PY" -c "import open_clip, open_clip_train" 2>/dev/null; then PEERS=torch,open_clip; else
    echo "gpu_data.sh: open_clip_torch not installed: no open_clip rows on this machine" >&2; fi
stamp "$PEERS, workers $TORCH_WORKERS"
"$PY" benchmarks/bench_dataloader.py "${COMMON[@]}" --backends "$PEERS" --threads "$TORCH_WORKERS" || STATUS=1

stamp "summary"
"$PY" benchmarks/bench_dataloader.py --summarize --results-dir "$RESULTS_DIR" || STATUS=1
stamp "done, status $STATUS; rows in $RESULTS_DIR/bench_dataloader.csv"
exit $STATUS
