"""``vlmbatch report``: OUT as one self-contained HTML page (README.md, "Report").

One pass over OUT's part files for the figures and the sample (report_data.py), thumbnails of the
sampled images only (report_images.py), the page (report_html.py), written to a temporary name and
renamed, so a failed report leaves nothing half written. An existing FILE is replaced only when it is an
earlier report (its head says so: ``GENERATOR``), or with ``force``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tasks.config import ImageConfig
from tasks.errors import ConfigError, UsageError
from tasks.inputs.manifests import read_images_manifest
from tasks.outputs.layout import STATE_DIR
from tasks.outputs.object_path import ObjectPath, OutPath
from tasks.outputs.report_data import collect_report, report_files
from tasks.outputs.report_html import GENERATOR, render_report
from tasks.outputs.report_images import make_thumbnails

MAX_SAMPLE = 5000  # a page of more cards is slow to open and no easier to read


@dataclass(frozen=True)
class ReportMade:
    rows: int
    sampled: int
    thumbnails: int  # sampled images shown
    missing: int  # sampled images that could not be shown (each card says why)
    bytes: int


def write_report(
    out: OutPath,
    dest: Path,
    *,
    images: Path | None = None,
    sample: int = 200,
    image_root: Path | None = None,
    id_column: str = "image_id",
    image_column: str = "image",
    allow_private_urls: bool = False,
    force: bool = False,
) -> ReportMade:
    """Write the report of ``out`` to ``dest``; UsageError (nothing written) for a bad OUT, FILE,
    manifest or option. An existing ``dest`` is replaced only when it is an earlier report, or with
    ``force``."""
    report_files(out)  # a vlmbatch output, before anything else is said about it
    _check_dest(out, dest, force)
    if not 0 <= sample <= MAX_SAMPLE:
        raise ConfigError(f"--sample must be between 0 and {MAX_SAMPLE}, not {sample}")
    manifest = None
    if images is not None:
        manifest = read_images_manifest(images, id_column=id_column, image_column=image_column).without_ids()
        root = image_root if image_root is not None else manifest.base_dir
        if not root.is_dir():
            raise ConfigError(f"--image-root {root} is not a directory")
    data = collect_report(out, sample=sample)
    thumbnails = None
    if manifest is not None:
        config = ImageConfig(allow_private_urls=allow_private_urls)
        ids = {row.image_id for row in data.sample if row.image_id is not None}
        thumbnails = make_thumbnails(manifest, ids, config, image_root=root.resolve())
    page = render_report(data, thumbnails).encode("utf-8")
    temporary = dest.with_name(f".tmp-{dest.name}")
    try:
        temporary.write_bytes(page)
        os.replace(temporary, dest)
    finally:
        temporary.unlink(missing_ok=True)
    shown = sum(1 for t in (thumbnails or {}).values() if t.url is not None)
    return ReportMade(data.rows, len(data.sample), shown, len(thumbnails or {}) - shown, len(page))


def _check_dest(out: OutPath, dest: Path, force: bool) -> None:
    if not isinstance(out, ObjectPath) and dest.resolve().is_relative_to(out.resolve()):
        raise UsageError(f"{dest} is inside {out}: a run would refuse an OUT holding it; write it elsewhere")
    if (dest.parent / STATE_DIR).is_dir():
        raise UsageError(f"{dest.parent} is a vlmbatch output: a file there would become part of it")
    if dest.is_dir():
        raise UsageError(f"{dest} is a directory; give a file name such as {dest / 'report.html'}")
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} does not exist")
    if dest.exists() and not force and not is_report(dest):
        raise UsageError(
            f"{dest} exists and is not an earlier report (which is all report replaces); choose another "
            "file with -o, or --force to replace it"
        )


HEAD_BYTES = 4096
BEFORE_THE_MARK = b"<title>vlmbatch report: "  # a report written before GENERATOR: its title, as early


def is_report(path: Path) -> bool:
    """Whether ``path`` is a page ``report`` wrote: ``GENERATOR`` (or, before it, the report's title) in
    its first few KB."""
    try:
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError:
        return False
    return GENERATOR.encode() in head or (head.startswith(b"<!doctype html>") and BEFORE_THE_MARK in head)
