# Two commands: `make run` serves the demo, `make test` runs the suite.
# Each creates .venv and installs what it needs; nothing to install first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench check clean system-deps soak fuzz matrix

# PYTHONWARNINGS: setuptools' notice that an editable install is one (printed on every
# install, a warning in form only) would greet a first `make run`.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo: a tiny HTTP backend on 127.0.0.1:8081 and triofwd in front of it on :8080.
# Then, from another terminal: curl http://127.0.0.1:8080/
#   python tools/inspect.py -s .triofwd-demo.sock top      curl 127.0.0.1:9090/metrics
run: $(STAMP)
	@$(PY) tools/demo_backend.py --port 8081 & backend=$$!; \
	trap 'kill $$backend 2>/dev/null' EXIT INT TERM; \
	$(PY) -m triofwd serve routes/demo.toml --access-log - --control .triofwd-demo.sock --metrics 127.0.0.1:9090

# Kernel-feature tests (nftables in a network namespace) need nft and ip, the status page's
# browser test Chromium, the log-rotation test logrotate, the UDP routes' DNS test dnsmasq
# (dnsmasq-base: the program without a system service) and dig; as root on Debian, install them,
# otherwise those tests skip with their reason.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! { command -v nft && command -v ip; } >/dev/null; then \
		echo "installing nftables and iproute2 for the kernel tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2 >/dev/null || echo "could not install nftables: its tests will skip"; \
	fi
	@missing=$$(for p in chromium logrotate; do command -v $$p >/dev/null || [ -x /usr/sbin/$$p ] || echo $$p; done); \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -n "$$missing" ]; then \
		echo "installing" $$missing "for the browser and log-rotation tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || echo "could not install $$missing: their tests will skip"; \
	fi
	@missing=$$(command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || echo dnsmasq-base; command -v dig >/dev/null || echo bind9-dnsutils); \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -n "$$missing" ]; then \
		echo "installing" $$missing "for the DNS test of UDP routes"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || echo "could not install $$missing: its tests will skip"; \
	fi

# ruff (lint, and the formatter's check on the package) and mypy --strict on triofwd/:
# the markers (# noqa, # type: ignore, # fmt: skip) mean something because these run.
lint: $(STAMP)
	$(VENV)/bin/ruff check triofwd tests tools fuzz
	$(VENV)/bin/ruff format --check triofwd
	$(VENV)/bin/mypy

test: lint system-deps
	$(PY) -m pytest -q

# Side-by-side benchmark (installs haproxy, nginx, iperf3, wrk, socat and uvloop first).
bench: $(STAMP)
	bash tools/bench_setup.sh
	$(PY) tools/bench.py

# Soak: the real daemon under mixed traffic and faults, checked every minute (tools/soak.py).
SOAK_ARGS ?= --minutes 30
soak: $(STAMP)
	$(PY) tools/soak.py $(SOAK_ARGS)

# The feature matrix alone, with its summary (it runs in `make test` too). A sample:
# make matrix MATRIX_ENV="TRIOFWD_MATRIX_SAMPLE=200"; replay one: TRIOFWD_MATRIX_SEED=...
MATRIX_ENV ?=
matrix: $(STAMP)
	$(MATRIX_ENV) $(PY) -m pytest -q -s tests/reliability/test_matrix.py

# Fuzzing with atheris (libFuzzer for Python): the route-file loader, the ClientHello parser,
# the PROXY codec and control messages, side by side and unbounded until Ctrl-C or the first
# crash (written to fuzz/crashes/). Bounded: make fuzz FUZZ_ARGS=-max_total_time=60
# (make test runs the same targets under hypothesis, bounded: tests/reliability/test_fuzz.py).
FUZZ_TARGETS := route_file clienthello proxy_protocol control
FUZZ_ARGS ?=
fuzz: $(STAMP)
	@$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install --quiet atheris || { \
		echo "make fuzz: atheris could not be installed into $(VENV): it ships wheels for CPython on x86-64/aarch64 Linux only, else it needs clang with libFuzzer to build"; exit 1; }
	@mkdir -p fuzz/crashes fuzz/logs
	@echo "fuzzing $(FUZZ_TARGETS) $(if $(FUZZ_ARGS),with $(FUZZ_ARGS),until Ctrl-C); logs in fuzz/logs/"
	@pids=; for t in $(FUZZ_TARGETS); do mkdir -p fuzz/corpus/$$t; \
		$(PY) fuzz/fuzz_$$t.py fuzz/corpus/$$t fuzz/seeds/$$t -artifact_prefix=fuzz/crashes/$$t- $(FUZZ_ARGS) > fuzz/logs/$$t.log 2>&1 & pids="$$pids $$!"; \
	done; trap 'kill $$pids 2>/dev/null' INT TERM; status=0; \
	for t in $(FUZZ_TARGETS); do set -- $$pids; pid=$$1; shift; pids="$$*"; \
		if wait $$pid; then echo "$$t: $$(grep -h '^Done' fuzz/logs/$$t.log)"; else status=1; echo "$$t: FAILED, see fuzz/logs/$$t.log and fuzz/crashes/"; fi; \
	done; exit $$status

check: $(STAMP)
	@for f in routes/*.toml routes/*.yaml routes/*.json; do [ -e "$$f" ] && $(PY) -m triofwd check "$$f"; done; true

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
