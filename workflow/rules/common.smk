# Shared helpers for the rules: the resolved paths of the model and data, and the table of runs.
import re
# Input problems (missing local files, unrecognised data formats, duplicate run ids) stop the
# workflow here, at parse time, before any job starts, with the config key named.
import json
from pathlib import Path

from spielbench.pipeline import resolve_pipeline, PipelineConfigError

try:
    PIPE = resolve_pipeline(config)
except PipelineConfigError as err:
    raise WorkflowError(f"config error: {err}") from None

RESOURCES = PIPE.resources_dir
RUNS_DIR = PIPE.runs_dir
RESULTS = PIPE.results_dir
MODEL_DIR = PIPE.model_dir
TRAIN_FILE = PIPE.train_file
HELDOUT_FILE = PIPE.heldout_file
RUNS = PIPE.runs                  # run id -> run config (dict, fully resolved)
RUN_IDS = list(RUNS)
EVAL_TARGETS = ["base"] + RUN_IDS
