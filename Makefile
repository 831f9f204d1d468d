# Two commands for a newcomer: `make book` and `make test`. Both create .venv first if it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test notebooks env clean gpu-smoke

env: $(STAMP)

# The environment: the project with its book and test extras, pinned by requirements/constraints.txt.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install -c requirements/constraints.txt -e ".[book,test]"
	touch $(STAMP)

# The HTML book from the stored outputs: _build/html/index.html
book: $(STAMP)
	$(BIN)/jupyter-book build --all .

# The whole test suite: unit tests and every chapter, re-executed and compared (strict nbval).
test: $(STAMP)
	$(BIN)/pytest --nbval

# On a machine with a GPU: every paper recipe a few steps, failing if anything ran on the CPU, then
# the device-contract and paper-profile tests on the GPU (see DEVELOPERS.md). About ten minutes.
gpu-smoke: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_devices.py tests/test_profiles.py \
		tests/test_comparison.py -k "gpu or device or paper"

# Re-run the chapters and store their outputs (after changing a chapter or the library).
notebooks: $(STAMP)
	$(BIN)/python book/execute.py

clean:
	rm -rf _build .jupyter_cache
