# Every target creates .venv if missing and installs krea2 into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.krea2-installed

.PHONY: setup demo test bench train-demo lint

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

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/dit_step.py
