# Two commands: `make run` serves the demo, `make test` runs the suite.
# Each creates .venv and installs what it needs; nothing to install first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test bench check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo: a tiny HTTP backend on 127.0.0.1:8081 and triofwd in front of it on :8080.
# Then, from another terminal: curl http://127.0.0.1:8080/
run: $(STAMP)
	@$(PY) tools/demo_backend.py --port 8081 & backend=$$!; \
	trap 'kill $$backend 2>/dev/null' EXIT INT TERM; \
	$(PY) -m triofwd serve routes/demo.toml --access-log -

test: $(STAMP)
	$(PY) -m pytest -q

# Side-by-side benchmark (installs haproxy, nginx, iperf3, wrk, socat and uvloop first).
bench: $(STAMP)
	bash tools/bench_setup.sh
	$(PY) tools/bench.py

check: $(STAMP)
	@for f in routes/*.toml routes/*.yaml routes/*.json; do [ -e "$$f" ] && $(PY) -m triofwd check "$$f"; done; true

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
