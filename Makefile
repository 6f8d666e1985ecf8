# make setup | demo | serve | test        (WEIGHTS=path/to/resnet50 weights file, optional)
# make setup-scale | db | db-stop          (Ray and PostgreSQL + pgvector: large collections)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WEIGHTS ?=
QUERY ?= search.jpg
HOST ?= 127.0.0.1
PORT ?= 8000

DB_DIR ?= .db

.PHONY: setup setup-dev setup-scale demo index-demo serve db db-stop test browser netns-tools bench bench-scale clean

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

setup-scale: $(VENV)/.installed-scale

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.installed-scale: $(VENV)/.installed requirements-scale.txt
	$(PY) -m pip install --quiet -r requirements-scale.txt
	touch $@

demo: index-demo
	$(PY) imagenet_search.py --query $(QUERY) --featuresPath imagenet_features.csv --save results.png

# The post's ResNet50 first; without internet (and no WEIGHTS=...) its
# ImageNet weights can't be had (exit status 2, one line saying why), and the
# demo goes on with efficientnet_lite0, whose weights came with pip.
# --rebuild: the file may hold the fallback's features from an earlier demo;
# it is only replaced once ResNet50 is loaded.
index-demo: setup
	@$(PY) create_imagenet_features.py --dataset icons --output imagenet_features.csv --rebuild $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	|| { status=$$?; [ $$status -eq 2 ] && [ -z "$(WEIGHTS)" ] || exit $$status; \
	     echo "demo: going on with efficientnet_lite0 (weights installed by pip)" >&2; \
	     $(PY) create_imagenet_features.py --dataset icons --output imagenet_features.csv --model efficientnet_lite0; }

# The search service and its web page on http://$(HOST):$(PORT)/ (indexes
# icons/ first, as the demo does, if there is no features file yet).
serve: setup
	@test -f imagenet_features.csv || $(MAKE) --no-print-directory index-demo
	$(PY) search_server.py --featuresPath imagenet_features.csv --host $(HOST) --port $(PORT)

# A local PostgreSQL + pgvector on 127.0.0.1 (data in $(DB_DIR)/, kept between
# runs); the last line printed is the URI for --db.
db: setup-scale
	@$(PY) -m search_utils.vector_db.local_server start $(DB_DIR)

db-stop: setup-scale
	@$(PY) -m search_utils.vector_db.local_server stop $(DB_DIR)

test: setup-dev setup-scale browser netns-tools
	$(PY) -m pytest -q

# The multi-node Ray tests run their cluster in a private network namespace
# (unshare, from util-linux; ip, from iproute2), where only loopback exists.
netns-tools:
	@command -v unshare >/dev/null && command -v ip >/dev/null || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq iproute2 util-linux >/dev/null; }

# The browser the web page's tests drive (Debian's chromium, through
# Playwright; Playwright's own browser download doesn't work offline).
browser:
	@test -x /usr/bin/chromium || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; }
	@test -x /usr/bin/chromium

# Speed against the post's approach, each script's last line the ratio
# (docs/PERFORMANCE.md). bench_ann.py builds 1,000,000 synthetic rows the
# first time (cached in bench/data/): allow an hour.
bench: setup
	$(PY) bench/bench_indexing.py
	$(PY) bench/bench_store.py
	$(PY) bench/bench_search.py
	$(PY) bench/bench_ann.py
	$(PY) bench/bench_service.py

# The optional engines against the embedded path: Ray indexing, pgvector search
# (bench_db.py reuses bench_ann.py's million rows; its first sync takes minutes).
bench-scale: setup-scale
	$(PY) bench/bench_ray.py
	$(PY) bench/bench_db.py

clean:
	rm -rf $(VENV) imagenet_features.csv imagenet_features.csv.* .imagenet_features.csv.*.tmp \
	       results.png search_results.png
