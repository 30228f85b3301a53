#!/usr/bin/env bash
# The main job: set up the locked environment, then run the whole default pipeline.
# Extra arguments go to snakemake, e.g. ./run.sh --configfile config/smoke.yaml
# A lock left by a killed run (kill -9, a lost session) is cleared first, but only when no live process
# of this pipeline uses this folder (scripts/stale_lock.py says how it decides); the workflow profile
# profiles/default (rerun triggers, rerun-incomplete) is named explicitly; the visible GPUs are the
# `gpu` resource, so that many GPU jobs run side by side, each on its own device (workflow/rules/gpus.smk).
# A later --resources in the arguments replaces this one.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/ensure_env.sh
# $$ is this shell's pid, which `exec` hands to snakemake
.venv/bin/python scripts/stale_lock.py clear --record-owner $$
gpus=$(.venv/bin/python scripts/gpu_slot.py --count)
exec .venv/bin/snakemake --workflow-profile profiles/default --cores all --resources "gpu=$gpus" "$@"
