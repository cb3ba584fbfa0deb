# onnxdream: the two front-door commands.
#   make demo  - installs onnxdream[cpu] (no deep learning framework) and dreams on a photo
#   make test  - installs the test extras (torch, torchvision, keras, ...), runs make lint, then
#                every test except the slow ones (see CONTRIBUTING.md); fetches Chromium and
#                onnxruntime-web (npm) for the browser tests when they are missing
#   make lint  - ruff, and lint-imports (the layers contract in pyproject.toml)
PYTHON ?= python3
DEMO_VENV := .venv-demo
TEST_VENV := .venv
# strict: the package is a tree of links to the source files (build/__editable__.*), so type
# checkers and IDEs resolve onnxdream.* like an installed package despite the folder mapping
EDITABLE := --config-settings editable_mode=strict
# ... and a new or removed package file needs a reinstall: the venvs depend on this list,
# which is rewritten only when the list of files changes (not when a file is edited)
PACKAGE_FILES := build/package-files.txt

.PHONY: demo test lint clean .chromium .ort-web FORCE

$(PACKAGE_FILES): FORCE
	@mkdir -p $(@D)
	@find engine exporters models -type f -not -path '*/__pycache__/*' | LC_ALL=C sort > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(DEMO_VENV)/.installed: pyproject.toml $(PACKAGE_FILES)
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q --upgrade pip
	$(DEMO_VENV)/bin/pip install -q -e '.[cpu]' $(EDITABLE)
	touch $@

demo: $(DEMO_VENV)/.installed
	mkdir -p out
	$(DEMO_VENV)/bin/onnxdream dream examples/chelsea.png -o out/chelsea-dream.png --seed 7
	$(DEMO_VENV)/bin/onnxdream predict out/chelsea-dream.png --top 3

$(TEST_VENV)/.installed: pyproject.toml $(PACKAGE_FILES)
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --upgrade pip
	$(TEST_VENV)/bin/pip install -q -e '.[cpu,test,serve]' $(EDITABLE)
	touch $@

# Debian's chromium for the browser test (installed when missing and apt is usable).
.chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium not installed; the browser test will be skipped (a failure under CI=true)"

# onnxruntime-web (MIT) for the in-browser tests, unpacked into a gitignored cache: `npm pack`
# only downloads the package (no node_modules, no install scripts); only the files a page loads are
# kept (engine/browser/site.py's ORT_FILES, 42 MB of 139). The version is engine/browser/site.py's
# ORT_WEB_VERSION; npm comes from apt when missing, like chromium.
ORT_WEB_VERSION := $(shell sed -n 's/^ORT_WEB_VERSION = "\(.*\)"/\1/p' engine/browser/site.py)
ORT_CACHE := .cache/onnxruntime-web
.ort-web:
	@test -f $(ORT_CACHE)/package/.version-$(ORT_WEB_VERSION) || { \
	  { command -v npm >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && apt-get install -y -qq npm >/dev/null ; } ; } && \
	  rm -rf $(ORT_CACHE) && mkdir -p $(ORT_CACHE) && cd $(ORT_CACHE) && \
	  npm pack --silent onnxruntime-web@$(ORT_WEB_VERSION) >/dev/null && \
	  tar xzf onnxruntime-web-$(ORT_WEB_VERSION).tgz && rm onnxruntime-web-$(ORT_WEB_VERSION).tgz && \
	  find package/dist -type f -not -name 'ort.wasm.min.mjs' -not -name 'ort.webgpu.min.mjs' \
	    -not -name 'ort-wasm-simd-threaded.mjs' -not -name 'ort-wasm-simd-threaded.wasm' \
	    -not -name 'ort-wasm-simd-threaded.asyncify.*' -delete && \
	  touch package/.version-$(ORT_WEB_VERSION) ; } || \
	  echo "note: onnxruntime-web not fetched; the in-browser tests will be skipped (a failure under CI=true)"

lint: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check .
	$(TEST_VENV)/bin/lint-imports

test: lint .chromium .ort-web
	$(TEST_VENV)/bin/python -m pytest -q -n 2 --dist loadgroup --durations=30

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) *.egg-info build
