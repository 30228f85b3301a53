#!/usr/bin/env bash
# The main job: set up the locked environment, then run the whole default pipeline.
# Extra arguments go to snakemake, e.g. ./run.sh --configfile config/smoke.yaml
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/ensure_env.sh
exec .venv/bin/snakemake --cores all "$@"
