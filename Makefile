# fastenc developer entry points. `make demo` and `make test` each work on a fresh clone (they run setup first).
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
PYTEST  := $(VPY) -m pytest
STAMP   := $(VENV)/.fastenc-installed
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup demo test test-slow test-all bench study-cpu llava-cpu clean

setup: $(STAMP)

# Everything pinned by .ci/constraints.txt (a full freeze of a working environment), the one place versions live:
# the lines below name packages, -c picks their versions (setup.py reads its pins from the same file). fastenc itself
# is installed editable without build isolation so its optional native build sees this torch instead of another.
$(STAMP): setup.py .ci/constraints.txt $(wildcard csrc/*.cpp)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q -c .ci/constraints.txt torch torchvision
	$(PIP) install -q -c .ci/constraints.txt deepspeed timm sentencepiece webdataset safetensors \
	    pyyaml tqdm tensorboard matplotlib pillow numpy ninja pytest pytest-timeout open_clip_torch \
	    nvidia-dali-cuda130 numba scikit_image transformers pyarrow
	@# The native extension is built in place first: setuptools >= 80 turns `pip install -e .` of a setup.py project
	@# into an isolated PEP 660 build that cannot see torch, so the editable install alone would skip fastenc._C.
	$(VPY) setup.py -q build_ext --inplace
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@# DeepSpeed JIT-builds its CPU shared-memory allreduce on first use (~2 min); do it once here, in one
	@# process, because several ranks building it at the same time can hang.
	$(VPY) -m fastenc.engine.distributed
	touch $(STAMP)

# The README's main job: tiny CLIP on synthetic shards (generated on first use), on this CPU, in a few minutes; then
# what it learned, on held-out images: zero-shot shape, color and word accuracy against chance (eval/demo/report.md).
demo: setup
	$(VPY) launch/pretrain.py --config configs/cpu/clip_tiny.yaml run.name=demo schedule.steps=80 schedule.warmup_steps=20 engine.checkpoint_every=0
	test -f data/synth_eval/manifest.json || $(VENV)/bin/fastenc data synth --out data/synth_eval --num-samples 6000 --seed 1
	$(VENV)/bin/fastenc eval runs/demo init:runs/demo --suite eval_demo --out eval/demo

# Default tier: fast CPU tests (minutes on 2 cores).
test: setup
	$(PYTEST) tests -m "not slow" -q --timeout 900

test-slow: setup
	$(PYTEST) tests -m "slow" -q --timeout 1800

test-all: setup
	$(PYTEST) tests -m "slow or not slow" -q --timeout 1800

bench: setup
	$(VPY) benchmarks/bench_train_step.py --config configs/cpu/clip_tiny.yaml

# The whole CPU study in one command (configs/cpu/study.yaml): held-out data, CLIP, SigLIP and DINO encoders, one
# LLaVA-style VLM per encoder, then every encoder and VLM evaluated into eval/cpu_study/report.md. Rerunning it skips
# the runs already trained, resumes interrupted ones and reuses finished evaluations.
study-cpu: setup
	$(VENV)/bin/fastenc study run configs/cpu/study.yaml

# The vision-language stage on the CPU study's CLIP run (trained here if `make study-cpu` has not): synthetic LLaVA
# data, stage 1, stage 2, then the accuracy on held-out images. Rerunning resumes or skips what is done.
llava-cpu: setup
	test -f runs/clip_tiny/export/encoder.safetensors || $(VPY) launch/pretrain.py --config configs/cpu/clip_tiny.yaml --resume
	test -f data/synth_vqa/heldout.json || $(VENV)/bin/fastenc data synth-vqa --out data/synth_vqa
	$(VPY) launch/pretrain.py --config configs/cpu/llava_tiny_stage1.yaml --resume
	$(VPY) launch/pretrain.py --config configs/cpu/llava_tiny_stage2.yaml --resume
	$(VENV)/bin/fastenc chat runs/llava_tiny_stage2 --score data/synth_vqa/heldout.json --images data/synth_vqa

clean:
	rm -rf $(VENV) build *.egg-info
