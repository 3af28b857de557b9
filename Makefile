# tar-lightning: every target creates .venv on first use.
#   make train OBJECTIVE=wkr ARGS="--model.inner_steps 8"
#   make train OBJECTIVE=hrr
#   make redteam OBJECTIVE=wkr ARGS="--redteam.quick true"
#   make test
#   make tensorboard
#   make bench BENCH_ARGS="--model-size 30M --inner-steps 16"

PYTHON ?= python3
VENV ?= .venv
OBJECTIVE ?= wkr
ARGS ?=
BENCH_ARGS ?=
# The CPU wheel of this release is what the tests run on; on a GPU cluster use the
# CUDA build of your choice, for example `make train TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: venv check-objective train redteam ablate test tensorboard bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# Objectives with a config of their own; configs/tiny.yaml is an overlay, not an objective.
OBJECTIVES := wkr hrr

check-objective:
	@if ! echo " $(OBJECTIVES) " | grep -q " $(OBJECTIVE) "; then \
		echo "error: OBJECTIVE=$(OBJECTIVE) is not available; choose one of: $(OBJECTIVES)" >&2; \
		exit 2; \
	fi

train: check-objective venv
	$(BIN)/tar-lightning fit --config configs/$(OBJECTIVE).yaml $(ARGS)

# Attacks the models that `make train` wrote; configs/redteam/$(OBJECTIVE).yaml lists them.
redteam: check-objective venv
	$(BIN)/tar-lightning redteam --config configs/redteam/$(OBJECTIVE).yaml $(ARGS)

test: venv
	$(OFFLINE) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

tensorboard: venv
	$(BIN)/tensorboard --logdir checkpoints

# TAR under the settings of configs/ablate/$(OBJECTIVE).yaml, each red-teamed; needs `make train` first.
ablate: check-objective venv
	$(BIN)/tar-lightning ablate --config configs/ablate/$(OBJECTIVE).yaml $(ARGS)

# TAR outer step against its floor; docs/benchmarks.md explains the output.
bench: venv
	$(BIN)/python -m tar_lightning.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
