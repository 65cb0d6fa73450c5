# The course's commands. Every target depends on `setup`, so a fresh clone needs nothing else:
#   make lesson LESSON=01      run a lesson script
#   make check LESSON=01       grade your exercises (IMPL=solutions grades the reference answers)
#   make progress              every lesson's exercises: passed / failed / TODO (re-graded when a file changed)
#   make try EX=1.2            one exercise: its first input, the expected and your output, the first difference
#   make hint EX=1.2           the next hint for that exercise (LEVEL=2: hints 1 and 2); make list: every exercise
#   make test                  what CI runs: solutions, the grader's own tests, every lesson (quick);
#                              PYTEST="tests/test_11_quantization.py -x" runs a part
#   make bench                 every lesson's full benchmark on the GPU -> lessons/results/results.md, .json
#                              (LESSON=07 re-runs one lesson)
#   make sanitize LESSON=01    make check under compute-sanitizer's memcheck (GPU): reads and writes out of bounds
#   make test-newest           make test on the newest torch and triton (past requirements.txt's bounds), in .venv-newest
#   make profile               lesson 12's profilers: torch.profiler, and Nsight Compute's DRAM bytes if ncu is installed
#   make notebooks             every lesson as a Jupyter notebook, notebooks/NN_topic.ipynb (installs jupytext)
#   make clean                 remove plots, caches and hint counters (not .venv, not your exercises)

PYTHON ?= python3
VENV := .venv
LESSON ?=
IMPL ?= exercises
PYTEST ?=
EX ?=
LEVEL ?=
# Recipes read these from the environment ("$$LESSON"), never pasted into the shell line by make:
# a value with quotes, backticks or $(...) in it stays a value and runs nothing.
export LESSON IMPL PYTEST EX LEVEL

# Use .venv once it exists; else the current Python if it already has the packages (a GPU box,
# Colab); else build .venv from requirements.txt.
ifneq ($(wildcard $(VENV)/.installed),)
  PY := $(VENV)/bin/python
  SETUP_STAMP := $(VENV)/.installed
else ifeq ($(shell $(PYTHON) -c "import torch, triton, numpy, matplotlib, pytest" >/dev/null 2>&1 && echo ok),ok)
  PY := $(PYTHON)
  SETUP_STAMP :=
else
  PY := $(VENV)/bin/python
  SETUP_STAMP := $(VENV)/.installed
endif

.PHONY: setup lesson check progress try hint list clean test bench profile sanitize test-newest help notebooks
.DEFAULT_GOAL := help

help:
	@sed -n '1,15p' Makefile | sed 's/^# \{0,1\}//'

setup: $(SETUP_STAMP)
	@echo "using $(PY)"

# Where the system Python already has torch and triton (a GPU box missing only pytest, say), the
# venv sees them (--system-site-packages) and pip installs only what is missing or out of range.
# Without an NVIDIA driver torch comes from its CPU wheels: the CUDA wheel's 3 GB of CUDA
# libraries are never used there. The versions are the tested pair for the machine
# (.ci/tested-gpu.txt or .ci/tested-cpu.txt, pip constraints); `make setup CONSTRAINTS=` takes
# the newest that requirements.txt allows instead.
# A torch the system Python already has is kept (no constraints then, only requirements.txt's range).
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
SYSTEM_TORCH := $(shell $(PYTHON) -c "import torch, triton" >/dev/null 2>&1 && echo yes)
CONSTRAINTS ?= $(if $(SYSTEM_TORCH),,.ci/tested-$(if $(HAS_NVIDIA),gpu,cpu).txt)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV) $(if $(SYSTEM_TORCH),--system-site-packages)
	$(VENV)/bin/pip install --upgrade pip
	@if [ -z "$(HAS_NVIDIA)" ] && ! $(VENV)/bin/python -c "import torch" >/dev/null 2>&1; then \
	  echo "no NVIDIA GPU here: torch's CPU wheel ($(TORCH_CPU_INDEX))"; \
	  $(VENV)/bin/pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) "$$(grep -E '^torch[<>=]' requirements.txt)" \
	    --index-url $(TORCH_CPU_INDEX) --retries 1 --timeout 20 \
	  || echo "torch's CPU index did not answer: the default index's torch instead (the CUDA build, 3 GB more)"; \
	fi
	$(VENV)/bin/pip install -r requirements.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(VENV)/bin/pip install --no-deps --no-build-isolation -e .
	touch $@

lesson: setup
	@$(PY) common/lessons.py run "$$LESSON"

check: setup
	@$(PY) tests/grader.py check "$$LESSON" --impl "$$IMPL"

progress: setup
	@$(PY) tests/grader.py progress --impl "$$IMPL"

try: setup
	@$(PY) tests/grader.py try "$$EX" --impl "$$IMPL"

hint: setup
	@$(PY) tests/grader.py hint "$$EX" $${LEVEL:+"$$LEVEL"}

sanitize: setup
	@$(PY) tests/grader.py sanitize "$$LESSON" --impl "$$IMPL"

list: setup
	@$(PY) tests/grader.py list

clean:
	rm -rf plots .grading_cache.json .hints_seen.json .pytest_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

# Each lesson script as a notebook, notebooks/NN_topic.ipynb (gitignored): jupytext splits it at its
# `# %%` markers. Installs the `notebooks` extra of pyproject.toml where it is missing (the same
# three packages; not `pip install -e .[notebooks]`, which could move a system Python's torch).
NOTEBOOK_PACKAGES := jupytext nbclient ipykernel
notebooks: setup
	@$(PY) -c "import jupytext, nbclient, ipykernel" >/dev/null 2>&1 || $(PY) -m pip install $(NOTEBOOK_PACKAGES)
	@mkdir -p notebooks
	@for script in $$(ls lessons/*/[0-9][0-9]_*.py | sort -t/ -k3); do \
	  name=$$(basename "$$script" .py); \
	  $(PY) -m jupytext --quiet --to ipynb --set-kernel python3 --output "notebooks/$$name.ipynb" "$$script" || exit 1; \
	  echo "notebooks/$$name.ipynb"; \
	done
	@echo "Open one in Jupyter, VS Code or Colab and run all cells (without a GPU they run in quick mode)."

# Solutions, the grader's own tests and every lesson script in quick mode. On a GPU the
# GPU-only tests (bf16, fp8, wrong-device errors) run too; without one they skip with a reason.
test: setup
	IMPL=solutions $(PY) -m pytest $$PYTEST

# What the next release will break: the newest torch and triton pip finds, in a venv of their own
# (2026-12-07: torch 2.15 / triton 3.9 pass on the CPU, 657 tests). A pip constraint file can cap them.
test-newest:
	$(PYTHON) -m venv .venv-newest
	.venv-newest/bin/pip install --upgrade torch triton numpy matplotlib pytest
	.venv-newest/bin/python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
	IMPL=solutions .venv-newest/bin/python -m pytest $$PYTEST

# LESSON=07 (or LESSON="07 08") re-runs those lessons only; the others' results stay. A lesson
# that fails is named at the end, after the others ran, and the target exits non-zero.
BENCH_DIR := lessons/results
bench: setup
	@$(PY) -c "import sys, common; sys.exit(0 if common.HAS_GPU else 'make bench times kernels and needs a CUDA GPU; without one, make lesson LESSON=NN runs the checks and the traffic analysis')"
	@failed=""; for n in $${LESSON:-$$($(PY) common/lessons.py numbers)}; do \
	  stem=$$($(PY) common/lessons.py stem $$n) || exit 2; \
	  rm -f $(BENCH_DIR)/$${stem%%_*}_*; \
	  echo "=== lesson $$n ==="; \
	  COURSE_RESULTS=$(BENCH_DIR) $(PY) common/lessons.py run $$n || failed="$$failed $$n"; \
	done; \
	$(PY) -m common results $(BENCH_DIR); \
	if [ -n "$$failed" ]; then echo "make bench: lesson(s)$$failed failed (see above)"; exit 1; fi

# Lesson 12's --profile: torch.profiler's kernel table, and Nsight Compute's measured DRAM bytes
# next to the modelled bytes where `ncu` is on PATH (it says so and goes on where it is not).
profile: setup
	@$(PY) common/lessons.py run 12 --profile
