# Shared helpers for the rules: the resolved paths of the model and data, and the table of runs.
# Input problems (a value the schema refuses: unknown keys, types, ranges, non-finite numbers; missing
# local files, unrecognised data formats, duplicate run ids, a CUDA device that is not there, budgets or
# target modules the model's layers do not allow, a max_seq_length shorter than the chat template, code
# execution without consent) stop the workflow here, at parse time, before any job starts, with the config
# key named in one line (spielbench.pipeline validates the config against workflow/schemas/config.schema.yaml).
import json
import os
import re
import shlex
import sys

import yaml

from spielbench.fsio import write_text_atomic
from spielbench.pipeline import PipelineConfigError, resolve_pipeline
from spielbench.runconfig import RunConfig

# The device exists only where jobs run: checked here for local execution, by each job on a cluster.
# Remote job processes re-parse this file; the checks against the model ran on the submit host already.
try:
    PIPE = resolve_pipeline(config, check_device=workflow.is_main_process and workflow.local_exec,
                            check_model=workflow.is_main_process)
except PipelineConfigError as err:
    raise WorkflowError(f"config error: {err}") from None

#: A run field's default when neither the run nor `training` sets it: RunConfig's, the one home of them.
RUN_DEFAULTS = RunConfig.defaults()
PYTHON = sys.executable              # the interpreter snakemake runs in (the project's .venv)
RESOURCES = PIPE.resources_dir
RUNS_DIR = PIPE.runs_dir
RESULTS = PIPE.results_dir
LOGS = config.get("logs_dir", "logs")
MODEL_DIR = PIPE.model_dir
TRAIN_FILE = PIPE.train_file
HELDOUT_FILE = PIPE.heldout_file
RUNS = PIPE.runs                     # run id -> run config (dict, fully resolved)
RUN_IDS = list(RUNS)
EVAL_TARGETS = ["base"] + RUN_IDS
RUN_PATTERN = "|".join(re.escape(r) for r in RUN_IDS)
EVAL_PATTERN = "|".join(re.escape(r) for r in EVAL_TARGETS)


def preflight_runs(log_path):
    """Check every run against the (now built) model as at parse time; returns the run ids checked.

    Raises WorkflowError ("config error: ...", naming the config key) and writes the message to the log."""
    try:
        checked = resolve_pipeline(config, check_device=workflow.local_exec, check_model=True)
    except PipelineConfigError as err:
        with open(log_path, "w") as fh:
            fh.write(f"error: {err}\n")
        raise WorkflowError(f"config error: {err}") from None
    with open(log_path, "w") as fh:
        fh.write(f"checked {len(checked.runs)} runs against {checked.model_dir}\n")
    return sorted(checked.runs)


def write_yaml_atomic(path, data):
    """Write ``data`` as YAML to ``path`` atomically (spielbench.fsio)."""
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=True))

def launcher_processes(method):
    """How many processes (one GPU each) config["launcher"] starts for a training run of ``method``."""
    launch = config.get("launcher", {})
    chosen = launch.get("methods")
    return 1 if chosen is not None and method not in chosen else max(1, launch.get("num_processes", 1))


def train_launcher(method):
    """The interpreter arguments that start ``-m spielbench.train`` for ``method`` (they follow ``PYTHON`` in
    the shell command): plain ``-m``, or ``accelerate launch`` with config["launcher"] (several GPUs per run:
    data parallel, or FSDP/DeepSpeed via an accelerate config). Shell-quoted already (the rule inserts it
    with {params.launch}, unquoted). The interpreter's path is left out: these are a params rerun trigger,
    and another spelling of the same interpreter must not retrain a run."""
    launch = config.get("launcher", {})
    n = launcher_processes(method)
    if n <= 1:
        return "-m"
    cmd = f"-m accelerate.commands.launch --num_processes {n}"
    if launch.get("accelerate_config"):
        cmd += f" --config_file {shlex.quote(launch['accelerate_config'])}"
    return cmd + " -m"
