# Two commands: `make demo` trains and evaluates a small vision-language model on this machine's CPU;
# `make test` runs the test suite. Both create (or reuse) the virtualenv in $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
MMFM := $(VENV)/bin/mmfm
DATA ?= data/synth
ifndef RUN
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
TORCH_VERSION ?= 2.13.0
LMMS_EVAL_VERSION ?= 0.7.3
DEEPSPEED_VERSION ?= 0.19.8
export HF_HUB_OFFLINE := 1

.PHONY: install demo test portability clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# The pinned CPU wheel first, where no torch is present: a bare `torch` pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	@# lmms-eval (the mmfm model class, mmfm.eval.lmms) without its requirements: they pull torch 2.14 and CUDA
	$(PY) -m pip install -q --no-deps "lmms-eval==$(LMMS_EVAL_VERSION)"
	@# DeepSpeed (engine.name=deepspeed) is a source package whose setup imports torch: built against the torch above
	$(PY) -m pip install -q --no-build-isolation "deepspeed==$(DEEPSPEED_VERSION)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(MMFM) data synth --out $(DATA)
	$(MMFM) train experiment=demo data.path=$(DATA) run_dir=$(RUN)
	@printf "\n== mmfm generate on held-out image files (true captions in $(DATA)/examples/captions.json) ==\n"
	$(MMFM) generate --checkpoint $(RUN) --images $(DATA)/examples/*.png
	@printf "\n== mmfm eval on the synthetic benchmark suite, beside a constant-answer baseline ==\n"
	$(MMFM) eval $(RUN) --baseline

test: install
	$(PY) -m pytest -q

# The convergence tests at 3 seeds on the native, AVX2 and scalar CPU paths (~1 h on 2 cores).
portability: install
	bash scripts/check_portability.sh

clean-runs:
	rm -rf runs outputs
