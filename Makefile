# Every target creates .venv if missing and installs krea2 into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.krea2-installed

.PHONY: setup demo test bench train-demo world-base world-ae world-ablation world-rl world-turbo world-style world-expander lora-demo serve lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on this machine it is a local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# the main job: a sample grid from the shipped world checkpoint, then its score on the public world prompts
demo: setup
	$(VENV)/bin/krea2 generate "a red circle" "a blue square" "a green triangle" "a yellow circle and a purple square" \
		"two orange triangles" "a large striped blue circle" "a red square above a blue circle" \
		"a small green triangle in the top left" --checkpoint world --out runs/main/samples
	$(VENV)/bin/krea2 eval world --checkpoint world --prompts world_eval --out runs/main/report.json

# a short version of recipes/world.toml from scratch (<= 20 minutes on 2 cores), then its evaluation
train-demo: setup
	$(VENV)/bin/krea2 train recipes/world-demo.toml --out runs/demo
	$(VENV)/bin/krea2 eval world --checkpoint runs/demo/final --prompts world_eval_small --out runs/demo/report.json

# the shipped world base model from scratch (~7 hours on 2 cores), then its evaluation; ship it with
#   .venv/bin/krea2 export runs/world-long2/final src/krea2/assets/world --to krea2 --dtype bf16 --overwrite
# (recipes/world-continue.toml is a measured continuation that was not shipped: BENCHMARKS.md)
world-base: setup
	$(VENV)/bin/krea2 train recipes/world.toml --out runs/world
	$(VENV)/bin/krea2 train recipes/world-extend.toml --out runs/world-extend --set model.init=runs/world/final
	$(VENV)/bin/krea2 train recipes/world-binding.toml --out runs/world-binding --set model.init=runs/world-extend/final
	OMP_NUM_THREADS=1 $(VENV)/bin/krea2 train recipes/world-ablation-pixel.toml --out runs/ablation/pixel \
		--set model.init=runs/world-binding/final
	OMP_NUM_THREADS=1 $(VENV)/bin/krea2 train recipes/world-long.toml --out runs/world-long \
		--set model.init=runs/ablation/pixel/final
	OMP_NUM_THREADS=1 $(VENV)/bin/krea2 train recipes/world-long.toml --out runs/world-long2 \
		--set model.init=runs/world-long/final --set stages.0.seed=81 --set stages.1.seed=82 \
		--set stages.0.steps=4000 --set stages.1.steps=1500
	$(VENV)/bin/krea2 eval world --checkpoint runs/world-long2/final --prompts world_eval --out runs/world-long2/report.json

# the world autoencoder (--vae world, shipped in src/krea2/assets/world_ae): ~17 minutes on 2 cores
world-ae: setup
	$(VENV)/bin/krea2 train-ae --out runs/world-ae
	$(VENV)/bin/krea2 eval ae --vae world:runs/world-ae/final --size 32
	$(VENV)/bin/krea2 eval ae --vae world:runs/world-ae/final --size 64

# the base-model ablation (pixel patch 4 vs latent patch 2, ~35 minutes each, side by side at 1 thread each)
world-ablation: setup
	bash scripts/base_ablation.sh runs/ablation

# the post-training chain from the shipped base, each rung from the one before: per-domain SFT -> TIES merge -> STPO
# (DPO beside it) -> calibration -> Flow-GRPO, every rung evaluated on the public prompts (about 2 hours on 2 cores,
# one thread; resumable). Ship the result (`--checkpoint world-rl`) and the aesthetic reward it was trained with:
#   .venv/bin/krea2 export runs/chain/rl/final src/krea2/assets/world_rl --to krea2 --dtype bf16 --overwrite
#   mkdir -p src/krea2/assets/world_aesthetic && cp runs/chain/aesthetic/aesthetic.* src/krea2/assets/world_aesthetic/
world-rl: setup
	bash scripts/world_chain.sh runs/chain

# Turbo: TDM distils the shipped base into guidance-free students on the Turbo grid (4 and 8 steps, and a 4-step
# DMD2 arm), with the teacher at 20/8/4 steps, a teacher LoRA on the student and the distillation extracted as LoRAs
# (about 3 hours on 2 cores; resumable). The shipped student (`--checkpoint world-turbo`) is the 8-step TDM run:
#   .venv/bin/krea2 export runs/turbo/tdm8/final src/krea2/assets/world_turbo --to krea2 --dtype bf16 --overwrite
world-turbo: setup
	bash scripts/world_turbo.sh runs/turbo

# the world style adapter (a style encoder and a rank-32 reference LoRA on the frozen base, from world triplets; ~55
# min at one thread), then its preference step (style pairs drawn by it, judged by style accuracy minus leakage; STPO
# on the encoder and the LoRA), then its evaluation; ship the better of runs/world-style/style and
# runs/world-style-po/po by `krea2 eval style` (`--style-encoder world`; session 10 shipped the supervised adapter,
# its preference step not yet run) with
#   cp DIR/{style.json,style_encoder.safetensors,lora.safetensors} src/krea2/assets/world_style/
world-style: setup
	$(VENV)/bin/krea2 train recipes/world-style.toml --out runs/world-style --resume
	test -f runs/world-style/pairs.parquet || $(VENV)/bin/krea2 pairs --kind style --style-encoder runs/world-style/style \
		--prompts 400 --out runs/world-style/pairs.parquet
	$(VENV)/bin/krea2 train recipes/world-style-po.toml --out runs/world-style-po --resume
	$(VENV)/bin/krea2 eval style --style-encoder runs/world-style-po/po --strength 1 --out runs/world-style-po/eval.json

# the prompt expander (--expander world): SFT then GRPO with TRL, evaluated at every creativity level, then shipped
# (about 1 hour on 2 cores; resumable)
world-expander: setup
	bash scripts/world_expander.sh runs/expander

# the web page and API on http://127.0.0.1:8000/ (Ctrl-C to stop)
serve: setup
	$(VENV)/bin/krea2 serve --checkpoint world

# a LoRA that binds the new word "zorb" to red circles on the world model, scored before and after (~3 minutes)
lora-demo: setup
	bash scripts/lora_demo.sh runs/lora-demo

test: setup
	$(VENV)/bin/python -m pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/dit_step.py
