# The two commands of a fresh machine (README.md): the first run creates the environment.
#   make demo    the whole pipeline on the embedded tiny model (CPU, minutes)
#   make test    the tests as CI runs them (make test-fast: without the end-to-end ones)

VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast stubs

$(STAMP): pyproject.toml .ci/install
	bash .ci/install
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhf demo --out runs/demo

# pytest's exit code 5 means it collected no test: a failure here, never a silent pass.
test: $(STAMP)
	$(VENV)/bin/python -m pytest --run-slow; code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$code

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest

stubs: $(STAMP)
	$(VENV)/bin/python protos/generate.py
