# brickwork: `make demo` and `make test` do all the set-up they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.brickwork-installed
TORCH  := torch==2.13.0
DEBS   := wordnet-base fortunes fortunes-min dict-gcide wngerman wdutch wportuguese wpolish wfrench wspanish witalian

.PHONY: demo test lint format setup debs bench-merge clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[hf,bench,dev,align,compress,search]"
	touch $(STAMP)

# Real labelled text for the benchmark comes from Debian packages (text suite: WordNet, GCIDE,
# fortunes, spelling lists; lm suite: GCIDE, FOLDOC, Jargon, English and German fortunes);
# install them when we can.
debs:
	@missing=""; \
	test -d /usr/share/wordnet || missing="$$missing wordnet-base"; \
	test -f /usr/share/games/fortunes/zippy || missing="$$missing fortunes fortunes-min"; \
	test -f /usr/share/dictd/gcide.dict.dz || missing="$$missing dict-gcide"; \
	test -f /usr/share/dictd/foldoc.dict.dz || missing="$$missing dict-foldoc"; \
	test -f /usr/share/dictd/jargon.dict.dz || missing="$$missing dict-jargon"; \
	test -d /usr/share/games/fortunes/de || missing="$$missing fortunes-de"; \
	for p in ngerman:wngerman dutch:wdutch portuguese:wportuguese polish:wpolish \
	         french:wfrench spanish:wspanish italian:witalian; do \
	  test -f /usr/share/dict/$${p%%:*} || missing="$$missing $${p#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "note: Debian packages missing:$$missing (sudo apt-get install$$missing); the benchmark skips what needs them"; fi; \
	fi

demo: setup debs
	$(VENV)/bin/brickwork bench --suite text

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint debs
	$(PY) -m pytest -n 2 --dist loadfile

bench-merge: setup
	$(PY) benchmarks/merge_vs_mergekit.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
