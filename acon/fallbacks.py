"""Which fast paths a run fell back from, and why: one warning each, and a record for ``results.json``.

A self-check (a fused kernel against the reference form, nvJPEG against CPU decoding) that fails calls
:func:`record`; the run continues on the slower, correct path and the trainer writes every rank's
:func:`recorded` (merged by :func:`across_ranks`) into ``results.json`` under ``"fallbacks"``.
"""

from __future__ import annotations

import warnings

_RECORDS: dict[str, str] = {}


def record(path: str, reason: str) -> None:
    """Note that ``path`` (e.g. ``"acon_c triton cuda bfloat16 channels_last"``) fell back, warning once."""
    if path in _RECORDS:
        return
    _RECORDS[path] = reason
    warnings.warn(
        f"acon: {path} failed its self-check ({reason}); continuing on the reference path", stacklevel=3
    )


def recorded() -> dict[str, str]:
    """Every fallback of this process so far: path → reason."""
    return dict(_RECORDS)


def across_ranks(per_rank: list[dict[str, str]]) -> dict[str, str]:
    """One record from every rank's :func:`recorded`: a path that fell back on only some ranks names them.

    ``[{"p": "why"}, {}]`` gives ``{"p": "why (rank 0 of 2)"}``; a path on every rank keeps its reason.
    """
    merged: dict[str, str] = {}
    for path in dict.fromkeys(p for records in per_rank for p in records):
        ranks = [r for r, records in enumerate(per_rank) if path in records]
        reason = per_rank[ranks[0]][path]
        if len(ranks) < len(per_rank):
            names = ", ".join(map(str, ranks))
            reason += f" (rank{'s' if len(ranks) > 1 else ''} {names} of {len(per_rank)})"
        merged[path] = reason
    return merged


class FallbackRecorded(AssertionError):
    """A fast path fell back where none may (a GPU test, the GPU check): the message lists each and why."""


def assert_none(where: str) -> None:
    """Raise :class:`FallbackRecorded` if any path fell back in this process so far (``where``: who asks)."""
    if _RECORDS:
        listed = "; ".join(f"{path}: {reason}" for path, reason in _RECORDS.items())
        raise FallbackRecorded(f"{where}: {len(_RECORDS)} fast path(s) fell back in this process: {listed}")


def clear() -> None:
    """Forget the records (tests)."""
    _RECORDS.clear()
