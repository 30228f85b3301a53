"""Resolve the Snakemake config into concrete paths and run configs, checking user input up front.

The workflow calls :func:`resolve_pipeline` at parse time (``workflow/rules/common.smk``), so a bad
config key, a missing local file or an unrecognised data format stops ``snakemake`` before any job
starts, with the offending key named. It first validates the config against its JSON schema
(``workflow/schemas/config.schema.yaml``, through :func:`spielbench.schema.validate`: types, ranges,
unknown keys, defaults filled in); this module then checks what a schema cannot: files on disk, formats,
duplicate run ids, and, through the run config and the method registry, each resolved run as its
training job will (``spielbench.preflight`` for the checks against the model).
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from spielbench.schema import PIPELINE_SCHEMA, RUN_SCHEMA, schema_at

#: Registry-built model sources and the folder (under resources/models) each is built into.
BUILT_MODELS = {"smollm2": "smollm2-135m-instruct", "tiny-random": "tiny-random"}

#: Run-config fields a pipeline config sets for every run in ``training`` (the run config schema's settings).
TRAINING_KEYS = tuple(k for k in schema_at(RUN_SCHEMA, "/$defs/settings")["properties"] if k != "spiel")


class PipelineConfigError(ValueError):
    """A config value that cannot work; the message starts with the config key."""


@dataclass
class Pipeline:
    """Concrete paths and runs of one workflow configuration (all paths relative to the workdir)."""

    resources_dir: str
    runs_dir: str
    results_dir: str
    model_source: str
    model_dir: str
    gguf_file: str | None
    train_file: str
    heldout_file: str
    user_train_file: str | None
    user_heldout_file: str | None
    runs: dict[str, dict] = field(default_factory=dict)
    #: The split of a local data.train without data.heldout (None otherwise): ``report`` (the JSON file
    #: ``spielbench.data.split_user_data`` writes beside the split), ``max_seq_length`` (the smallest of
    #: the runs: longer examples are dropped before the split, so every run trains on the same examples)
    #: and ``on_malformed``.
    user_split: dict | None = None
    #: The validation split for learning-rate selection (the mixture's, or ``data.validation``); None
    #: when there is none (then no run may be tuned).
    validation_file: str | None = None
    #: Run id -> tuned target (``spielbench.tuning.target_of``) of every run that trains at the learning
    #: rate the tune stage chooses (its config has no ``learning_rate``); the target's template run.
    tuned: dict[str, str] = field(default_factory=dict)
    tune_targets: dict[str, dict] = field(default_factory=dict)


def run_id_for(entry: dict) -> str:
    """The default id of a run entry: ``<method>[-r<rank>][-s<seed>]`` (seed only when given per run)."""
    if entry.get("id"):
        return entry["id"]
    rid = entry["method"]
    if entry.get("rank") is not None:
        rid += f"-r{entry['rank']}"
    if entry.get("seed") is not None:
        rid += f"-s{entry['seed']}"
    return rid


def _check_file(key: str, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise PipelineConfigError(f"{key}: file {path!r} does not exist")
    return p


def _check_data_file(key: str, path: str, on_malformed: str) -> None:
    """Validate a local data file (``spielbench.formats.read_instruction_file``); with ``data.on_malformed:
    skip`` say on stderr how many malformed records the jobs will skip, and the first lines.

    Raises:
        PipelineConfigError: ``<key>: <file>:<line>: ...`` at the first malformed record (strict), or
            when no record is valid.
    """
    import sys

    from spielbench.errors import InputError
    from spielbench.formats import read_instruction_file

    try:
        read = read_instruction_file(path, on_malformed=on_malformed, keep_examples=False)
    except InputError as err:
        hint = " (data.on_malformed: skip leaves malformed records out)" if on_malformed == "error" else ""
        raise PipelineConfigError(f"{key}: {err}{hint}") from None
    if read.skipped:
        first = "; ".join(f"line {n}: {r}" for _, n, r in read.skipped[:3])
        print(f"note: {key}: {len(read.skipped)} malformed record(s) of {path} will be skipped "
              f"(data.on_malformed: skip); {first}", file=sys.stderr)


def _config_key(i: int, entry: dict, field_path: str) -> str:
    """The config key a run field came from: ``runs[i].<field>`` when the run entry sets it (or only a run
    entry can, like ``rank``), else ``training.<field> (runs[i])`` for a value inherited from the training
    defaults, or the data/model key the pipeline filled it from."""
    top, _, sub = field_path.partition(".")
    own = entry.get(top)
    if top in entry and (not sub or (isinstance(own, dict) and sub.split(".")[0] in own)):
        return f"runs[{i}].{field_path}"
    if top in ("model", "train_data", "heldout_data"):
        return {"model": "model.source", "train_data": "data.train", "heldout_data": "data.heldout"}[top] + \
            f" (runs[{i}])"
    if top in ("run_id",):
        return f"runs[{i}].id"
    if top in TRAINING_KEYS or top == "spiel":
        return f"training.{field_path} (runs[{i}])"
    return f"runs[{i}].{field_path}"  # a field only a run entry sets (rank, method)


def _run_error(i: int, entry: dict, err: Exception) -> PipelineConfigError:
    """Turn the ``InputError`` of one run (``"<field>: <detail>"``) into an error naming the config key."""
    msg = str(err)
    if msg.startswith(f"runs[{i}]"):
        return PipelineConfigError(msg)
    field_path, sep, detail = msg.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./]*", field_path):
        fields = field_path.split("/")  # "rank/density"
        return PipelineConfigError(f"{' / '.join(_config_key(i, entry, f) for f in fields)}: {detail}")
    return PipelineConfigError(f"runs[{i}]: {msg}")


def _check_run(i: int, entry: dict, run: dict, model_info, check_device: bool) -> None:
    """Validate one resolved run as the training entry point will: fields and method rules, the device,
    and (when ``model_info`` is known) the checks against the model (``spielbench.preflight``).

    Raises:
        PipelineConfigError: naming the config key (e.g. ``runs[3].rank``, ``training.device (runs[0])``).
    """
    from spielbench.errors import InputError
    from spielbench.methods import get_method
    from spielbench.preflight import check_run_against_model, resolve_device
    from spielbench.runconfig import RunConfig

    try:
        cfg = RunConfig.from_mapping(dict(run), source=f"runs[{i}]")
        spec = get_method(cfg.method)
        spec.check_config(cfg)
        device = resolve_device(cfg.device) if check_device else None
        if model_info is not None:
            check_run_against_model(cfg, spec, model_info, device)
    except InputError as err:
        raise _run_error(i, entry, err) from None


def user_split_key(path: str) -> str:
    """The folder name of a user file's train/held-out split: 16 hex digits of the sha256 of its absolute
    path and its bytes, so that configs with different ``data.train`` never share or overwrite a split."""
    digest = hashlib.sha256(os.path.abspath(path).encode() + b"\0")
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _model_info(source: str, model_dir: str, gguf: str | None):
    """What the parse-time checks read from the model (config and tokenizer, no weights), or None with
    a note on stderr when the model is built by a job that has not run yet (then the training job runs
    the same checks before it writes anything).

    A ``.gguf`` source is read from its converted folder when present, else from the file's metadata."""
    import sys

    from spielbench.errors import InputError
    from spielbench.preflight import load_model_info

    try:
        if (Path(model_dir) / "config.json").is_file():
            return load_model_info(model_dir)
        if gguf is not None:
            return load_model_info(str(Path(gguf).parent), gguf_file=Path(gguf).name)
    except InputError as err:
        raise PipelineConfigError(f"model.source: {err}") from None
    print(f"note: model.source {source!r} is not built yet ({model_dir}); the checks of rank, density, "
          "target modules and max_seq_length against it run at the start of each training job", file=sys.stderr)
    return None


def check_evaluation(ev: dict, check_device: bool = True) -> None:
    """Evaluation settings that cannot work: tasks that execute model-written code without consent. With
    ``check_device`` on a machine without CUDA, a warning on stderr when ``evaluation.dtype`` is bfloat16
    and this CPU has no fast bf16 (:func:`spielbench.evaluate.slow_bf16_note`).

    Raises:
        PipelineConfigError: ``evaluation.allow_code_execution: ...`` naming the task.
    """
    from spielbench.evaluate import TASKS, slow_bf16_note

    for name in ev.get("tasks", []):
        if name in TASKS and TASKS[name].executes_code and not ev.get("allow_code_execution", False):
            raise PipelineConfigError(
                f"evaluation.allow_code_execution: task {name!r} (in evaluation.tasks) runs model-written code "
                "to score it; set evaluation.allow_code_execution: true to allow that, or remove the task")
    if check_device and ev.get("dtype") == "bfloat16":
        import sys

        import torch

        slow = None if torch.cuda.is_available() else slow_bf16_note("bfloat16")
        if slow:
            print(f"warning: {slow}", file=sys.stderr)


def resolve_pipeline(config: dict, check_device: bool = True, check_model: bool = True) -> Pipeline:
    """Validate the workflow config against its schema (filling in its defaults, in place) and turn it into
    a :class:`Pipeline`.

    Args:
        config: the workflow config as read (Snakemake's ``config``).
        check_device: check that a requested CUDA device exists here (off on a cluster submit host).
        check_model: check every run against the model's config and tokenizer (``spielbench.preflight``).

    Raises:
        PipelineConfigError: a value the schema refuses (unknown key, wrong type, out of range, non-finite
            number: ``runs[1].rank: expected an integer >= 1, got 0``), a local model or data path is
            missing or has the wrong form, a data file is in none of the accepted instruction formats, two
            runs share an id, a method that needs a rank has none, CUDA requested without CUDA, a
            rank/density/target module the model's layers do not allow, a ``max_seq_length`` shorter than
            the chat template's overhead, or a code-executing task without ``evaluation.allow_code_execution``.
            The message names the config key (e.g. ``runs[3].rank``).
    """
    from spielbench.errors import InputError
    from spielbench.schema import validate

    try:
        validate(config, PIPELINE_SCHEMA, fill_defaults=True)
    except InputError as err:
        raise PipelineConfigError(str(err)) from None
    resources = config.get("resources_dir", "resources")
    runs_dir = config.get("runs_dir", "runs")
    results = config.get("results_dir", "results")

    # --- model -------------------------------------------------------------------------------
    source = config.get("model", {}).get("source", "smollm2")
    gguf = None
    if source in BUILT_MODELS:
        model_dir = f"{resources}/models/{BUILT_MODELS[source]}"
    elif source.endswith(".gguf"):
        gguf = str(_check_file("model.source", source))
        model_dir = f"{resources}/models/{Path(source).stem}"
    else:
        p = Path(source).expanduser()
        if not p.is_dir():
            raise PipelineConfigError(
                f"model.source: {source!r} is neither 'smollm2', 'tiny-random', an existing model folder "
                "nor a .gguf file")
        if not (p / "config.json").exists():
            raise PipelineConfigError(
                f"model.source: folder {source!r} has no config.json (expected a transformers model folder)")
        model_dir = str(p)

    # --- data --------------------------------------------------------------------------------
    from spielbench.formats import validate_instruction_file

    data = config.get("data", {})
    train = data.get("train", "mixture")
    heldout = data.get("heldout")
    on_malformed = data.get("on_malformed", "error")
    user_train = user_heldout = None
    validation_file = data.get("validation")
    if validation_file is not None:
        _check_file("data.validation", validation_file)
        _check_data_file("data.validation", validation_file, on_malformed)
        validation_file = str(Path(validation_file).expanduser())
    if train == "mixture":
        train_file = f"{resources}/data/mixture/train.jsonl"
        heldout_file = f"{resources}/data/mixture/heldout.jsonl"
        if validation_file is None:
            validation_file = f"{resources}/data/mixture/validation.jsonl"
    else:
        _check_file("data.train", train)
        _check_data_file("data.train", train, on_malformed)
        user_train = str(Path(train).expanduser())
        split_dir = f"{resources}/data/user/{user_split_key(user_train)}"
        train_file, heldout_file = f"{split_dir}/train.jsonl", f"{split_dir}/heldout.jsonl"
        if validation_file is None and heldout is None:  # the split also draws a validation set
            validation_file = f"{split_dir}/validation.jsonl"
    if heldout is not None:
        _check_file("data.heldout", heldout)
        _check_data_file("data.heldout", heldout, on_malformed)
        user_heldout = str(Path(heldout).expanduser())
        heldout_file = user_heldout
        if user_train is not None:
            train_file = user_train

    ev = config.get("evaluation", {})
    for key in ("bbh_path", "tydiqa_path"):
        if ev.get(key) is not None:
            _check_file(f"evaluation.{key}", ev[key])
    check_evaluation(ev, check_device)

    # --- runs --------------------------------------------------------------------------------
    from spielbench.tuning import TuningError, check_grids

    grids = (config.get("tuning") or {}).get("grids") or {}
    try:
        check_grids(grids)
    except TuningError as err:
        raise PipelineConfigError(str(err)) from None
    defaults = copy.deepcopy(config.get("training", {}))
    spiel_defaults = defaults.pop("spiel", {})
    runs: dict[str, dict] = {}
    model_info = _model_info(source, model_dir, gguf) if check_model and config.get("runs") else None
    for i, entry in enumerate(config.get("runs", [])):
        method = entry["method"]
        rid = run_id_for(entry)
        if rid == "base":
            raise PipelineConfigError(f"runs[{i}].id: 'base' is reserved (the evaluation of the base model)")
        if rid in runs:
            raise PipelineConfigError(f"runs[{i}]: a second run with id {rid!r}; give one an `id`")
        run = {k: defaults[k] for k in TRAINING_KEYS if k in defaults}
        run.update({k: v for k, v in entry.items() if k not in ("id", "spiel")})
        run["rank"] = entry.get("rank")  # explicit None for methods without a rank budget
        if "spiel" in method:
            run["spiel"] = {**spiel_defaults, **entry.get("spiel", {})}
            if method == "spiel-static":
                # the static ablation has no reselection: the method fixes the policy ("none")
                run["spiel"].pop("reselection_rate_policy", None)
        elif entry.get("spiel"):  # refused by the method's check below, naming runs[i].spiel
            run["spiel"] = entry["spiel"]
        if "learning_rate" not in run and method not in grids:
            raise PipelineConfigError(f"runs[{i}].learning_rate: not set here nor in training.learning_rate, "
                                      f"and tuning.grids has no grid for method {method!r} to choose it")
        run.update(run_id=rid, model=model_dir, train_data=train_file, heldout_data=heldout_file)
        if on_malformed != "error":  # only non-defaults, so that existing run configs stay as they are
            run["on_malformed"] = on_malformed
        if user_train is not None and user_heldout is None:
            run["data_report"] = user_split_report(train_file)
        _check_run(i, entry, run, model_info, check_device)
        runs[rid] = run
    user_split = None
    if user_train is not None and user_heldout is None:
        from spielbench.runconfig import RunConfig

        default_len = RunConfig.__dataclass_fields__["max_seq_length"].default
        user_split = {"report": user_split_report(train_file), "on_malformed": on_malformed,
                      "max_seq_length": min([r.get("max_seq_length", default_len) for r in runs.values()]
                                            or [default_len])}
    from spielbench.tuning import target_of, tuned_targets

    tune_targets = tuned_targets(runs, grids)
    tuned = {rid: target_of(r["method"], r.get("rank")) for rid, r in runs.items() if "learning_rate" not in r}
    if tuned and validation_file is None:
        raise PipelineConfigError(
            f"data.validation: runs {sorted(tuned)} choose their learning rate on a validation split, and a local "
            "data.train has none; give data.validation (an instruction file disjoint from data.train and "
            "data.heldout), or a learning_rate to every run")
    return Pipeline(
        resources_dir=resources, runs_dir=runs_dir, results_dir=results, model_source=source,
        model_dir=model_dir, gguf_file=gguf, train_file=train_file, heldout_file=heldout_file,
        user_train_file=user_train, user_heldout_file=user_heldout, runs=runs, user_split=user_split,
        validation_file=validation_file, tuned=tuned, tune_targets=tune_targets,
    )


def user_split_report(train_file: str) -> str:
    """The report of the user split, beside its train file (``report.json``)."""
    return str(Path(train_file).with_name("report.json"))
