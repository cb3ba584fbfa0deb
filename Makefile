# onnxdream: the two front-door commands.
#   make demo  - installs onnxdream[cpu] (no deep learning framework) and dreams on a photo
#   make test  - installs the test extras (torch, torchvision, keras, ...) and runs every test
PYTHON ?= python3
DEMO_VENV := .venv-demo
TEST_VENV := .venv

.PHONY: demo test clean .chromium

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q --upgrade pip
	$(DEMO_VENV)/bin/pip install -q -e '.[cpu]'
	touch $@

demo: $(DEMO_VENV)/.installed
	mkdir -p out
	$(DEMO_VENV)/bin/onnxdream dream examples/chelsea.png -o out/chelsea-dream.png --seed 7
	$(DEMO_VENV)/bin/onnxdream predict out/chelsea-dream.png --top 3

$(TEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --upgrade pip
	$(TEST_VENV)/bin/pip install -q -e '.[cpu,test,serve]'
	touch $@

# Debian's chromium for the browser test (installed when missing and apt is usable).
.chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium not installed; the browser test will be skipped"

test: $(TEST_VENV)/.installed .chromium
	$(TEST_VENV)/bin/python -m pytest -q --durations=10

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) *.egg-info
