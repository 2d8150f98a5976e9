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

.PHONY: install browser slurm demo test test-fast lint bench clean-demo llama-cpp llama-cpp-python

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	# DeepSpeed builds against the installed torch, hence no build isolation.
	$(PY) -m pip install --quiet --no-build-isolation -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP) browser slurm

browser:
	{ command -v chromium && fc-list :lang=zh family | grep -q .; } >/dev/null 2>&1 || { $(SUDO) apt-get update && \
		$(SUDO) apt-get install -y chromium fonts-wqy-microhei; }

# tests/test_prepare_data_datatrove.py runs the corpus stage on a real single-node Slurm cluster that it starts on
# loopback (tests/local_slurm.py): Debian's Slurm and munge packages, installed with apt-get when missing. No
# daemon is enabled or started system-wide; the test starts its own, with every file in a temporary folder.
slurm:
	{ PATH="$$PATH:/usr/sbin:/sbin"; for p in sbatch srun scontrol squeue sinfo scancel slurmctld slurmd munged \
		mungekey; do command -v $$p || exit 1; done; } >/dev/null 2>&1 || { $(SUDO) apt-get update && \
		$(SUDO) apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge; }

# The whole pipeline on the built-in demo data, chained through data/demo_run/ and ending in model_save/demo:
# corpus -> tokenizer -> pretraining -> SFT -> rejected answers -> DPO -> evaluation -> one chat reply.
demo: $(STAMP)
	$(PY) prepare_data.py --config config/demo/prepare_data.yaml
	$(PY) train_tokenizer.py --config config/demo/tokenizer.yaml
	$(PY) pre_train.py --config config/demo/pretrain.yaml
	$(PY) sft_train.py --config config/demo/sft.yaml
	$(PY) generate_rejected.py --config config/demo/generate_rejected.yaml
	$(PY) dpo_train.py --config config/demo/dpo.yaml
	$(PY) eval_model.py --config config/demo/evaluate.yaml
	$(PY) eval_model.py report --run_dir model_save/demo
	$(PY) chat.py --config config/demo/chat.yaml --message "你好！"

# Two workers (pytest-xdist), each taking whole test modules, so a module's fixtures are built once; the 25
# slowest tests are listed at the end (the CI run has a ~20 minute budget).
TEST_WORKERS ?= 2
# ZHLM_MAKE_TEST: what `make install` installs (Slurm) must be there; a test skips for its absence only outside.
test: install llama-cpp
	ZHLM_MAKE_TEST=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=25 tests

# The edit-test loop: the unit tests, without the stage runs (pytest marker `slow`, pyproject.toml); under a
# minute on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check .

# llama.cpp for export.py (GGUF): its converter (convert_hf_to_gguf.py's conversion/ and gguf-py/) from the
# llama-cpp-python source distribution, which vendors llama.cpp; fetched once per machine into a cache.
# `make llama-cpp-python` also builds that distribution (CPU only; long on few cores, once) for
# bench/bench_gguf.py and the round-trip test, which run the exported files in llama.cpp.
LLAMA_CPP_PYTHON ?= 0.3.36
WHEELS ?= $(HOME)/.cache/zhlm-wheels
LLAMA_CPP_DIR ?= $(HOME)/.cache/zhlm/llama.cpp-$(LLAMA_CPP_PYTHON)
LLAMA_SDIST := $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
LLAMA_VENDOR := llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF

$(LLAMA_SDIST):
	mkdir -p $(WHEELS)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(WHEELS) llama-cpp-python==$(LLAMA_CPP_PYTHON)

$(LLAMA_CPP_DIR)/conversion/__init__.py: | $(LLAMA_SDIST)
	rm -rf $(LLAMA_CPP_DIR).tmp && mkdir -p $(LLAMA_CPP_DIR).tmp
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_CPP_DIR).tmp --strip-components=3 \
		$(addprefix $(LLAMA_VENDOR)/,convert_hf_to_gguf.py conversion gguf-py LICENSE)
	rm -rf $(LLAMA_CPP_DIR) && mv $(LLAMA_CPP_DIR).tmp $(LLAMA_CPP_DIR)

llama-cpp: $(STAMP) $(LLAMA_CPP_DIR)/conversion/__init__.py

llama-cpp-python: llama-cpp
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		nice -n 10 $(PY) -m pip wheel --no-deps -w $(WHEELS) $(LLAMA_SDIST)
	$(PY) -m pip install --quiet $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl

bench: install llama-cpp-python
	$(PY) -m bench.bench_dedup
	$(PY) -m bench.bench_tokenizer
	$(PY) -m bench.bench_pretrain
	$(PY) -m bench.bench_sft_tokenize
	$(PY) -m bench.bench_corpus
	$(PY) -m bench.bench_datatrove
	$(PY) -m bench.bench_gguf
	$(PY) -m bench.bench_peft_methods

clean-demo:
	rm -rf data/demo_run model_save/demo
