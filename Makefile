# unclip developer entry points. `make demo` and `make test` set everything up from scratch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
PROMPT ?= a red circle in the top left corner

.PHONY: demo test install tools protos lint lint-protos bench clean

# The venv is reinstalled whenever pyproject.toml changes.
$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

install: $(INSTALLED)

# buf (the protobuf linter) from the npm registry, kept out of the repository.
$(BUF):
	npm install --silent --no-save --no-package-lock --prefix .tools @bufbuild/buf@$(BUF_VERSION)

tools: $(BUF)

demo: $(INSTALLED)
	$(BIN)/unclip generate "$(PROMPT)" --seed 0 --out out

test: $(INSTALLED) $(BUF)
	$(BIN)/python -m pytest -q

protos: $(INSTALLED)
	$(BIN)/python tools/gen_protos.py

lint: $(INSTALLED) $(BUF)
	$(BIN)/ruff check unclip encoder_svc prior_svc decoder_svc gateway tools tests
	$(BUF) lint protos

lint-protos: $(BUF)
	$(BUF) lint protos

bench: $(INSTALLED)
	$(BIN)/unclip bench pipeline

clean:
	rm -rf $(VENV) .tools out .pytest_cache
