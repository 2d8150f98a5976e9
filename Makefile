# Two commands on a fresh machine: `make demo` (the whole pipeline on the demo corpus, CPU) and
# `make test`. Both create the virtualenv and install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch is installed first, on its own, so nothing else pulls a different build. Here (CPU) this is
# the local CPU wheel; on a GPU machine see README "Installing on a GPU machine".
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# tests/test_web.py drives Debian's chromium (never a browser downloaded by playwright); a CJK font keeps
# its screenshots legible. Installed with apt-get when missing (sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser demo test bench clean-demo

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	# DeepSpeed builds against the installed torch, hence no build isolation.
	$(PY) -m pip install --quiet --no-build-isolation -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP) browser

browser:
	{ command -v chromium && fc-list :lang=zh family | grep -q .; } >/dev/null 2>&1 || { $(SUDO) apt-get update && \
		$(SUDO) apt-get install -y chromium fonts-wqy-microhei; }

# The whole pipeline on the built-in demo data, chained through data/demo_run/ and ending in model_save/demo:
# corpus -> tokenizer -> pretraining -> SFT -> rejected answers -> DPO -> evaluation -> one chat reply.
demo: $(STAMP)
	$(PY) prepare_data.py --config config/demo/prepare_data.yaml
	$(PY) train_tokenizer.py --config config/demo/tokenizer.yaml
	$(PY) pre_train.py --config config/demo/pretrain.yaml
	$(PY) sft_train.py --config config/demo/sft.yaml
	$(PY) generate_rejected.py --config config/demo/generate_rejected.yaml
	$(PY) dpo_train.py --config config/demo/dpo.yaml
	$(PY) evaluate.py --config config/demo/evaluate.yaml
	$(PY) evaluate.py report --run_dir model_save/demo
	$(PY) chat.py --config config/demo/chat.yaml --message "你好！"

# Two workers (pytest-xdist), each taking whole test modules, so a module's fixtures are built once.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

bench: install
	$(PY) bench/bench_dedup.py
	$(PY) bench/bench_tokenizer.py
	$(PY) bench/bench_pretrain.py
	$(PY) bench/bench_sft_tokenize.py
	$(PY) bench/bench_corpus.py

clean-demo:
	rm -rf data/demo_run model_save/demo
