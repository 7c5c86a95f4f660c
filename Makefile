# Everything installs into .venv; the two commands a user needs are `make run CSV=...` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PINS   := constraints.txt
CSV    ?=
ARGS   ?=
# One stamp per install set, so `make run` after `make test` (and the reverse) each find theirs.
BASE_STAMP  := $(VENV)/.installed-torch
RUN_STAMP   := $(VENV)/.installed-run
VOCAB_STAMP := $(VENV)/.installed-clip-vocab
ALL_STAMP   := $(VENV)/.installed-all

.PHONY: setup run test lint random-model demo clean

# pyspark (the spark extra) needs a Java runtime: the one on PATH or JAVA_HOME; else one sentence.
setup: $(ALL_STAMP)
	@$(BIN)/python -c "from sim_pipeline.spark.session import java_problem; print(java_problem() or '', end='')"

# torch first and pinned (constraints.txt): a looser requirement would pull a multi-GB CUDA build.
$(BASE_STAMP): $(PINS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(PINS) torch
	touch $@

# Scoring a CSV: the core dependencies and S3 stores, nothing of Airflow.
$(RUN_STAMP): $(BASE_STAMP) pyproject.toml
	$(BIN)/pip install --quiet -c $(PINS) -e '.[s3]'
	touch $@

# open_clip_torch only supplies the CLIP BPE vocabulary for random-weight checkpoints (no deps).
$(VOCAB_STAMP): $(BASE_STAMP)
	$(BIN)/pip install --quiet --no-deps -c $(PINS) open_clip_torch
	touch $@

# Tests: every extra.
$(ALL_STAMP): $(BASE_STAMP) $(VOCAB_STAMP) pyproject.toml
	$(BIN)/pip install --quiet -c $(PINS) -e '.[s3,onnx,serve,airflow,spark,dev]'
	touch $@

run: $(RUN_STAMP)
	@test -n "$(CSV)" || { echo "usage: make run CSV=path/to/pairs.csv [ARGS='--chunk-size 5000']"; exit 2; }
	$(BIN)/sim-pipeline score "$(CSV)" $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest $(ARGS)

lint: setup
	$(BIN)/ruff check .

# A random-weight CLIP for offline trials: its scores are meaningless.
random-model: $(RUN_STAMP) $(VOCAB_STAMP)
	$(BIN)/python -m sim_pipeline.devtools.random_model .sim-pipeline/random-clip

# Offline, about a minute: random-weight model, images on 127.0.0.1, examples/pairs.csv scored.
demo: $(RUN_STAMP) $(VOCAB_STAMP)
	$(BIN)/python -m sim_pipeline.devtools.demo $(ARGS)

clean:
	rm -rf $(VENV) .sim-pipeline .pytest_cache

# Airflow on http://127.0.0.1:$(AIRFLOW_PORT) with the similarity_scoring DAG, to trigger from the UI
# (no login, loopback only; Ctrl-C stops it). Metadata in .sim-pipeline/airflow; see README.
AIRFLOW_PORT ?= 8080
.PHONY: airflow
airflow: setup
	$(BIN)/python -m bin.airflow_local --port $(AIRFLOW_PORT) $(ARGS)

# The production topology on loopback (CeleryExecutor, two workers on queues fetch + inference,
# PostgreSQL, Redis, SeaweedFS), started in the background; see docs/airflow.md.
STACK_PORT ?= 8080
.PHONY: stack stack-down
stack: setup
	$(BIN)/python -m bin.stack up --port $(STACK_PORT) $(ARGS)

# Stops exactly what `make stack` started (by the PIDs in .sim-pipeline/stack/state.json);
# ARGS=--purge also drops its databases, broker queue and S3 data (also after a plain stop).
stack-down:
	$(BIN)/python -m bin.stack down $(ARGS)

# The exports under which `airflow ...` and `sim-pipeline results ...` reach that stack:
#   eval "$$(make -s stack-env)"
.PHONY: stack-env
stack-env:
	@$(BIN)/python -m bin.stack env $(ARGS)
