"""``raml index --bad-images {error,skip}``: the images about to be embedded, checked before any embedding.

Contract: :func:`screen_work` takes the work list of :func:`raml.deploy.index.index_images` (the new and the
changed images only; those already indexed and unchanged are never read) and checks each file with
:func:`raml.data.check.check_image`'s fast mode (headers and a few tail bytes, no pixels; in threads, through
:func:`raml.data.check.scan_split`). Then:

- ``"error"``: any bad file raises :class:`IndexBadImagesError` (a ``ValueError``: ``raml index`` exits with
  status 2) naming how many, the first ones with their reasons, and a report listing all of them
  (``bad_images_index.txt`` in the index folder when it holds an index, else a temporary file, so a refused
  first build still leaves no folder behind). Nothing is embedded and the index is not changed.
- ``"skip"``: the bad files are left out of the work list (a warning names each one) and listed in
  ``skipped_images_index.txt`` in the index folder (``path<TAB>reason``, written atomically; a run that skips
  none removes an old one). The shards' resume key is computed over the paths actually embedded, so a rerun
  with the same inputs and the same bad files resumes the finished shards. New images left out give up no id:
  the ids of the kept new images stay consecutive. An indexed image whose file changed and is now bad keeps
  its previous row and stamp (it is checked again next time).

Limit: the fast mode finds missing, empty and unidentifiable files and truncated JPEG/PNG files (see
:mod:`raml.data.check`); an image that passes it but fails to decode during the extraction still stops the
run, as before (finished shards are kept).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from raml.data.check import BAD_IMAGE_POLICIES, BadImage, report_file_name, scan_split, write_bad_image_report
from raml.data.splits import Split

logger = logging.getLogger(__name__)

__all__ = ["BadImagePolicy", "IndexBadImagesError", "REPORT_NAMES", "Screened", "screen_work"]

BadImagePolicy = Literal["error", "skip"]

ERROR_REPORT = report_file_name("bad_images", "index")
"""``bad_images_index.txt``: every bad file of a refused run (``--bad-images error``)."""
SKIP_REPORT = report_file_name("skipped_images", "index")
"""``skipped_images_index.txt``: the files a ``--bad-images skip`` run left out."""
REPORT_NAMES = (ERROR_REPORT, SKIP_REPORT)
"""Files of an index folder that are neither index files nor foreign: the reports of this module."""

LISTED = 10
"""Bad files named in the error message (all of them are in the report)."""

CHECK_THREADS = 8
"""Threads checking files (the fast mode mostly waits on file reads)."""


class IndexBadImagesError(ValueError):
    """Images to index are bad and the policy is ``"error"``; nothing was embedded.

    Attributes:
        bad: Every bad image (``path`` as given to ``index_images``).
        report_file: The file listing all of them (``path<TAB>reason``).
    """

    def __init__(self, bad: Sequence[BadImage], total: int, report_file: Path) -> None:
        self.bad = list(bad)
        self.report_file = report_file
        lines = [f"{len(self.bad)} of the {total} images to embed are bad; nothing was embedded or changed:"]
        lines += [f"  {b.path}: {b.reason}" for b in self.bad[:LISTED]]
        if len(self.bad) > LISTED:
            lines.append(f"  ... and {len(self.bad) - LISTED} more")
        missing = sum(b.reason == "missing file" for b in self.bad)
        if missing:
            lines.append(
                f"{missing} of them do not exist (relative paths in a list file are relative to the list file's "
                "folder)."
            )
        lines.append(f"Full list: {report_file}")
        lines.append(
            "Fix or remove these files, or pass --bad-images skip (index_images(bad_images='skip')) to index the "
            f"rest without them (they are then listed in {SKIP_REPORT} in the index folder)."
        )
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Screened:
    """The work list of ``index_images`` once the bad images are out (all lists in the same order)."""

    paths: list[str]
    ids: list[int]
    labels: list[int]
    reembedded: int
    num_ids: int
    bad: list[BadImage]
    report: Path | None

    def summary(self) -> dict[str, object]:
        """The keys ``index_images`` adds to its summary (``raml index --json``)."""
        return {"bad_images_skipped": len(self.bad), "bad_images_report": str(self.report) if self.report else None}


def screen_work(
    policy: BadImagePolicy,
    index_dir: Path,
    has_index: bool,
    paths: Sequence[str],
    ids: Sequence[int],
    labels: Sequence[int],
    reembedded: int,
    fresh_from: int,
    num_ids: int,
    image_size: int | None = None,
    progress: bool = False,
) -> Screened:
    """Check the images about to be embedded and apply ``policy`` (see the module's docstring).

    Args:
        policy: ``"error"`` or ``"skip"``.
        index_dir: The index folder (reports go there).
        has_index: Whether ``index_dir`` holds an index (``index.json``) already.
        paths, ids, labels: The work list: new images first, then the ``reembedded`` changed ones (the last
            entries).
        reembedded: How many of the last entries are indexed images whose file changed.
        fresh_from: The first id given to a new image in this run (ids from it on are renumbered when some new
            images are left out, so that the kept ones stay consecutive).
        num_ids: Ids in use after this run before screening (rows of the next generation).
        image_size: The resolution the images will be embedded at (an image too large once resized is bad).
        progress: Show a progress bar.

    Raises:
        ValueError: Unknown policy.
        IndexBadImagesError: Policy ``"error"`` and at least one bad image.
    """
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"Unknown bad_images policy {policy!r}; valid policies: {', '.join(BAD_IMAGE_POLICIES)}.")
    keep = Screened(list(paths), list(ids), list(labels), reembedded, num_ids, [], None)
    if not paths:
        return keep
    # a "split" of the given paths: Path(".") / p is p, relative (to the working folder) or absolute
    work = Split(name="index", root=Path("."), paths=tuple(paths), labels=(0,) * len(paths))
    bad = scan_split(work, workers=CHECK_THREADS, progress=progress, image_size=image_size)
    skip_report = index_dir / SKIP_REPORT
    if policy == "error":
        if not bad:
            (index_dir / ERROR_REPORT).unlink(missing_ok=True)  # an old refusal's list, now fixed
            return keep
        if has_index:
            report = index_dir / ERROR_REPORT
        else:  # a refused first build leaves no folder behind: the list goes to a temporary file
            with tempfile.NamedTemporaryFile("w", prefix="raml-index-bad-images-", suffix=".txt", delete=False) as f:
                report = Path(f.name)
        write_bad_image_report(report, bad)
        raise IndexBadImagesError(bad, len(paths), report)

    (index_dir / ERROR_REPORT).unlink(missing_ok=True)
    if not bad:
        skip_report.unlink(missing_ok=True)  # an old run's list: this run skipped none
        return keep
    if len(bad) == len(paths) and not has_index:
        shown = "; ".join(f"{b.path}: {b.reason}" for b in bad[:LISTED])
        raise ValueError(f"All {len(bad)} images to index are bad ({shown}{'; ...' if len(bad) > LISTED else ''}).")
    write_bad_image_report(skip_report, bad)
    logger.warning(
        "Skipping %d of the %d images to embed that are bad (list in %s):\n%s",
        len(bad),
        len(paths),
        skip_report,
        "\n".join(f"  {b.path}: {b.reason}" for b in bad),
    )
    dropped = {b.path for b in bad}
    first_changed = len(paths) - reembedded
    kept = [i for i, p in enumerate(paths) if p not in dropped]
    new_ids, next_fresh = [], fresh_from
    for i in kept:
        if i < first_changed and ids[i] >= fresh_from:  # a new image's new id: renumbered, consecutive
            new_ids.append(next_fresh)
            next_fresh += 1
        else:  # an id the image had (an indexed image, or --overwrite's previous index)
            new_ids.append(ids[i])
    had_fresh = any(i < first_changed and ids[i] >= fresh_from for i in range(len(paths)))
    return Screened(
        paths=[paths[i] for i in kept],
        ids=new_ids,
        labels=[labels[i] for i in kept],
        reembedded=sum(1 for i in kept if i >= first_changed),
        num_ids=next_fresh if had_fresh else num_ids,
        bad=bad,
        report=skip_report,
    )
