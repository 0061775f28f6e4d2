# Two commands: `make run` serves the demo, `make test` runs the suite.
# Each creates .venv and installs what it needs; nothing to install first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test bench check clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo: a tiny HTTP backend on 127.0.0.1:8081 and triofwd in front of it on :8080.
# Then, from another terminal: curl http://127.0.0.1:8080/
#   python tools/inspect.py -s .triofwd-demo.sock top      curl 127.0.0.1:9090/metrics
run: $(STAMP)
	@$(PY) tools/demo_backend.py --port 8081 & backend=$$!; \
	trap 'kill $$backend 2>/dev/null' EXIT INT TERM; \
	$(PY) -m triofwd serve routes/demo.toml --access-log - --control .triofwd-demo.sock --metrics 127.0.0.1:9090

# Kernel-feature tests (nftables in a network namespace) need nft and ip; as root on
# Debian, install them, otherwise those tests skip with their reason.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! { command -v nft && command -v ip; } >/dev/null; then \
		echo "installing nftables and iproute2 for the kernel tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2 >/dev/null || echo "could not install nftables: its tests will skip"; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

# Side-by-side benchmark (installs haproxy, nginx, iperf3, wrk, socat and uvloop first).
bench: $(STAMP)
	bash tools/bench_setup.sh
	$(PY) tools/bench.py

check: $(STAMP)
	@for f in routes/*.toml routes/*.yaml routes/*.json; do [ -e "$$f" ] && $(PY) -m triofwd check "$$f"; done; true

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
