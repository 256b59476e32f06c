#!/usr/bin/env bash
# The training step on one GPU in one run: fastenc's real trainer (ZeRO-1/2/3, compile on/off, CLIP/SigLIP/DINO
# paper recipes on 224 px JPEG shards) against the plain PyTorch loop of the same objective and open_clip's model +
# loss in that loop (benchmarks/gpu_train_step.py says what each case measures).
#
#   bash benchmarks/gpu_train_step.sh --fetch-wheels      # here, with network: the wheels the GPU machine lacks
#   bash benchmarks/gpu_train_step.sh                     # on the GPU machine: rows in benchmarks/results/gpu/
#   bash benchmarks/gpu_train_step.sh --tiny [DIR]        # anywhere: the same cases on the CPU recipes, rows in DIR
#                                                         # (default: a temp dir); tests/test_gpu_train_step_script.py
#
# Wheels (WHEELS_DIR, default benchmarks/wheels, git-ignored): deepspeed (built with DS_BUILD_OPS=0: pure Python),
# its pydantic/hjson dependencies, webdataset, braceexpand, open_clip_torch, ftfy, wcwidth, for CPython 3.12 on
# x86_64 (the GPU machine's Python); about 6 MB. They are installed into /tmp/fastenc-site, without the network,
# only when `import deepspeed, webdataset, open_clip` fails. Budget: under 6 minutes on one H200 (12 cases, each a
# fresh process; data generation and wheel install ~30 s).
# Environment: PY (python), WHEELS_DIR, CASES (comma list, default all), TIMEOUT per case (default 300 s).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS_DIR=${WHEELS_DIR:-benchmarks/wheels}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
stamp() { echo "[gpu_train_step +$(( $(date +%s) - START ))s] $*"; }
ARGS=()
[[ -n "${CASES:-}" ]] && ARGS+=(--cases "$CASES")
ARGS+=(--timeout "${TIMEOUT:-300}")

# Python 3.12 manylinux wheels of everything fastenc's trainer and the open_clip peer need beyond the GPU image.
PURE_WHEELS="hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 webdataset==1.0.2
             braceexpand==0.1.7 open_clip_torch==3.3.0 ftfy==6.3.1"
BINARY_WHEELS="pydantic_core==2.50.5 wcwidth==0.9.4"
DEEPSPEED=deepspeed==0.19.8

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS_DIR"
    PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$WHEELS_DIR" $PURE_WHEELS $BINARY_WHEELS || exit 1
    # DeepSpeed ships an sdist only; without its ops (JIT-built on demand) the wheel is pure Python. Its setup.py
    # imports torch, so it builds with this environment's torch and no build isolation.
    SRC=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$SRC" "$DEEPSPEED" || exit 1
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS_DIR" "$SRC"/deepspeed-*.tar.gz \
        || exit 1
    rm -rf "$SRC"
    ls -l "$WHEELS_DIR"
    exit 0
fi

if [[ "${1:-}" == "--tiny" ]]; then
    OUT=${2:-$(mktemp -d -t fastenc_gpu_train_step.XXXXXX)}
    stamp "tiny: CPU recipes, rows in $OUT"
    "$PY" benchmarks/gpu_train_step.py --tiny --out-dir "$OUT" "${ARGS[@]}"
    STATUS=$?
    stamp "done, status $STATUS"
    exit $STATUS
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_train_step.sh: no CUDA device here; run with --tiny for the CPU check" >&2
    exit 2
fi
# shellcheck source=benchmarks/gpu_wheels.sh
source benchmarks/gpu_wheels.sh
ensure_wheels gpu_train_step.sh "deepspeed, webdataset, braceexpand, open_clip"
"$PY" - <<'EOF'
import torch, deepspeed
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "deepspeed", deepspeed.__version__)
EOF
stamp "cases"
"$PY" benchmarks/gpu_train_step.py --out-dir "${RESULTS_DIR:-benchmarks/results/gpu}" "${ARGS[@]}"
STATUS=$?
stamp "done, status $STATUS"
exit $STATUS
