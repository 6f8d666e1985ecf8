# make setup | demo | test        (WEIGHTS=path/to/resnet50 weights file, optional)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WEIGHTS ?=
QUERY ?= search.jpg

.PHONY: setup setup-dev demo test bench clean

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The post's ResNet50 first; without internet (and no WEIGHTS=...) its
# ImageNet weights can't be had (exit status 2, one line saying why), and the
# demo goes on with efficientnet_lite0, whose weights came with pip.
# --rebuild: the file may hold the fallback's features from an earlier demo;
# it is only replaced once ResNet50 is loaded.
demo: setup
	@$(PY) create_imagenet_features.py --dataset icons --output imagenet_features.csv --rebuild $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	|| { status=$$?; [ $$status -eq 2 ] && [ -z "$(WEIGHTS)" ] || exit $$status; \
	     echo "demo: going on with efficientnet_lite0 (weights installed by pip)" >&2; \
	     $(PY) create_imagenet_features.py --dataset icons --output imagenet_features.csv --model efficientnet_lite0; }
	$(PY) imagenet_search.py --query $(QUERY) --featuresPath imagenet_features.csv --save results.png

test: setup-dev
	$(PY) -m pytest -q

# Speed against the post's approach, each script's last line the ratio
# (docs/PERFORMANCE.md). bench_ann.py builds 1,000,000 synthetic rows the
# first time (cached in bench/data/): allow an hour.
bench: setup
	$(PY) bench/bench_indexing.py
	$(PY) bench/bench_store.py
	$(PY) bench/bench_search.py
	$(PY) bench/bench_ann.py

clean:
	rm -rf $(VENV) imagenet_features.csv imagenet_features.csv.* .imagenet_features.csv.*.tmp \
	       results.png search_results.png
