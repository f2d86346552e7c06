# immunocto developer commands. Every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extras the Makefile targets need (grows as stages land). `train`/`sam` bring torch 2.14.1 (from
# this machine's disk) and segment-anything, so the SAM plumbing is tested too.
EXTRAS ?= dev,train,sam,app,dist,docs

.PHONY: setup browser demo test docs bench lint clean device-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: setup
	$(BIN)/immunocto run

# The review app's browser tests drive Debian's chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

test: setup browser
	$(BIN)/python -m pytest -q

# The documentation site (docs/, mkdocs.yml) into site/; any warning is an error.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Benchmarks on real images read them from DATA (see docs/development.md).
DATA ?= ../shared/data

bench: setup
	$(BIN)/python benchmarks/simulate_scale.py --sizes 2048 4096 --baseline
	$(BIN)/python benchmarks/segment_sim.py --size 4096 --seed 3 --backends if-nuclear he
	@if [ -d $(DATA) ]; then \
		$(BIN)/python benchmarks/io_read.py $(DATA)/cmu_small_region.svs $(DATA)/instanseg_he_example.ome.tif && \
		$(BIN)/python benchmarks/segment_real.py --consep $(DATA)/consep_train.npz \
			--consep-csv $(DATA)/consep_train_nuclei.csv \
			--dsb $(DATA)/dsb2018_nuclei_img.tif $(DATA)/dsb2018_nuclei_mask.tif; \
	else echo "($(DATA) not found: skipping the benchmarks on real data)"; fi

# Wheels (CPython 3.12, x86-64) of what the device machine's image lacks, for `benchmarks/gpu.py`
# there: `.whl/` is git-ignored and travels with `carry: [".whl"]` (see benchmarks/gpu.py).
DEVICE_WHEELS ?= pydantic pydantic-core annotated-types typing-inspection zarr numcodecs donfig \
	crc32c tiffslide imagecodecs segment-anything typer
device-wheels:
	mkdir -p .whl
	grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
	for w in $(DEVICE_WHEELS); do \
		$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
			--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
			--platform manylinux2014_x86_64 --platform any -d .whl $$w || exit 1; done

lint: setup
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/ruff format --check src tests benchmarks docs

clean:
	rm -rf $(VENV) immunocto-demo site .pytest_cache .ruff_cache
