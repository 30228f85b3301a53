#!/usr/bin/env bash
# The main job: set up the locked environment, then run the whole default pipeline.
# Extra arguments go to snakemake, e.g. ./run.sh --configfile config/smoke.yaml
# A lock left by a killed run (kill -9, a lost session) is cleared first, but only when no live process
# of this pipeline uses this folder (scripts/stale_lock.py says how it decides); the workflow profile
# profiles/default (rerun triggers, rerun-incomplete, GPU slots) is named explicitly.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/ensure_env.sh
# $$ is this shell's pid, which `exec` hands to snakemake
.venv/bin/python scripts/stale_lock.py clear --record-owner $$
exec .venv/bin/snakemake --workflow-profile profiles/default --cores all "$@"
