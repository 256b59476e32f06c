#!/usr/bin/env bash
# The LLaVA stage-2 training step on one GPU in one command: fastenc's engine (DeepSpeed ZeRO-1, bf16) with pad-to-
# longest batches, against padding to a fixed max_length and against the plain PyTorch loop of the same module
# (benchmarks/bench_vlm_step.py says what each row measures). A random-init ~1.1B Llama (llama_1b: TinyLlama's shape,
# 32000 vocabulary rows) behind a frozen ViT-B/16 at 384 px: 576 image tokens + ~128 text tokens per sample, batch 16,
# the paper stage-2 recipe (configs/paper/llava_stage2.yaml: LLaVA-1.5's optimizer, LM gradient checkpointing) on
# one GPU, so ZeRO-1 rather than its ZeRO-3 (ZeRO-3 only pays off across GPUs: results/gpu/gpu_train_step.csv).
# EXTRA="objective.lm.grad_checkpointing=false" measures without checkpointing (a 1B LM fits an H100 without it).
#
#   bash benchmarks/gpu_train_step.sh --fetch-wheels     # here, with network: the wheels the GPU machine lacks
#                                                         # (deepspeed and its pydantic/hjson; the same set)
#   FASTENC_GIT_REV=<short rev> bash benchmarks/gpu_vlm_step.sh     # on the GPU machine: rows in results/gpu/
#   bash benchmarks/gpu_vlm_step.sh --tiny [DIR]          # anywhere: the same command at tiny sizes on the CPU,
#                                                         # rows in DIR (default: a temp dir); checked by
#                                                         # tests/test_gpu_vlm_step_script.py
#
# FASTENC_GIT_REV: the GPU machine gets a copy of the working tree whose .git may be stale, so the caller names the
# revision the rows record (fastenc.utils.provenance); unset, the copy's own .git is asked.
# Wheels (WHEELS_DIR, default benchmarks/wheels, git-ignored) are installed into /tmp/fastenc-site, without the
# network, only when `import deepspeed` fails; transformers, tokenizers and safetensors are in the GPU image.
# Budget: about 3 minutes of one H100/H200 (wheels ~30 s, data + LM creation ~40 s, each impl's process ~60 s:
# loading the 1.1B LM, building the engine, 36 engine steps and 18 plain-loop steps of ~0.2-0.3 s).
# Environment: PY (python), WHEELS_DIR, RESULTS_DIR (default benchmarks/results/gpu), TIMEOUT per impl (default 240 s),
# BATCH (default 16), EXTRA (more bench_vlm_step.py arguments, e.g. "--repeats 5").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS_DIR=${WHEELS_DIR:-benchmarks/wheels}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
stamp() { echo "[gpu_vlm_step +$(( $(date +%s) - START ))s] $*"; }
# shellcheck disable=SC2206
EXTRA_ARGS=(${EXTRA:-})

if [[ "${1:-}" == "--tiny" ]]; then
    OUT=${2:-$(mktemp -d -t fastenc_gpu_vlm_step.XXXXXX)}
    stamp "tiny: llama_tiny + vit_test on the CPU, rows in $OUT"
    "$PY" benchmarks/bench_vlm_step.py --lm-preset llama_tiny --model vit_test --text-tokens 32 --batch 2 \
        --pool 1 --steps 2 --warmup 0 --repeats 1 --precision fp32 --zero-stage 1 --wait-idle 0 --threads 1 \
        --timeout 120 --work-dir "$OUT/cache" --out "$OUT/vlm_step.csv" --note "tiny check" "${EXTRA_ARGS[@]}"
    STATUS=$?
    stamp "done, status $STATUS"
    exit $STATUS
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_vlm_step.sh: no CUDA device here; run with --tiny for the CPU check" >&2
    exit 2
fi
# shellcheck source=benchmarks/gpu_wheels.sh
source benchmarks/gpu_wheels.sh
ensure_wheels gpu_vlm_step.sh "deepspeed, transformers, tokenizers, safetensors"
[[ -n "${FASTENC_GIT_REV:-}" ]] || stamp "FASTENC_GIT_REV is unset: the rows record this copy's .git revision"
"$PY" - <<'EOF'
import torch, deepspeed, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "deepspeed",
      deepspeed.__version__, "transformers", transformers.__version__)
EOF
RESULTS=${RESULTS_DIR:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
stamp "bench_vlm_step: llama_1b, 576 image + ~128 text tokens, bf16, ZeRO-1"
"$PY" benchmarks/bench_vlm_step.py --config configs/paper/llava_stage2.yaml \
    --lm-preset llama_1b --lm-vocab 32000 --vocab 4096 --model vit_base_patch16_224 --image-size 384 \
    --text-tokens 128 --batch "${BATCH:-16}" --pool 4 \
    --steps 5 --warmup 3 --repeats 3 --precision bf16 --zero-stage 1 --timeout "${TIMEOUT:-240}" \
    --work-dir /tmp/fastenc_vlm_step --out "$RESULTS/vlm_step.csv" "${EXTRA_ARGS[@]}" 2>&1 \
    | tee "$RESULTS/vlm_step.log"
STATUS=${PIPESTATUS[0]}
stamp "done, status $STATUS"
exit "$STATUS"
