"""Atomic file writes shared by the harness: a reader sees the old file or the complete new one.

Every output (metrics, evaluation results, tables, notebooks, assets) goes through
:func:`atomic_write`: a temporary file in the destination folder, ``fsync``, then ``os.replace``;
on an exception the temporary file is removed and the destination is left as it was. The file gets
the permissions a normally created one would have (``mkstemp`` creates 0600; the umask is honoured).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike, is_dir: bool = False) -> None:
    """Give a temp file/folder the permissions a normally created one would have."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[io.IOBase]:
    """Open a temporary file next to ``path`` (``mode`` "w" for UTF-8 text or "wb"); on success
    ``os.replace`` it onto ``path``. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def json_default(obj: Any) -> Any:
    """JSON form of the values measurements hold besides JSON's own: a tensor or array (a number when it
    has one element, else a nested list), a numpy/torch scalar (its number), a path, a torch dtype or device
    (its string).

    Raises:
        TypeError: any other object (as :func:`json.dumps` does).
    """
    if hasattr(obj, "tolist") and hasattr(obj, "numel"):  # torch.Tensor
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj).__module__ == "torch" and type(obj).__name__ in ("dtype", "device"):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars and arrays of one element
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """Write ``obj`` as indented JSON (plus a final newline) to ``path`` atomically.

    ``dumps_kwargs`` go to :func:`json.dumps` (e.g. ``ensure_ascii=False``); ``default`` is
    :func:`json_default` unless given. Raises TypeError (nothing written) for a value JSON cannot hold.
    """
    dumps_kwargs.setdefault("default", json_default)
    write_text_atomic(path, json.dumps(obj, indent=2, **dumps_kwargs) + "\n")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to ``out_dir`` that becomes ``out_dir`` when the block succeeds (files and
    folders made readable, an existing ``out_dir`` replaced: a reader sees the old folder or the complete
    new one). On an exception the temporary folder is removed and an existing ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        publish_mode(tmp, is_dir=True)
        for p in tmp.rglob("*"):
            publish_mode(p, is_dir=p.is_dir())
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
