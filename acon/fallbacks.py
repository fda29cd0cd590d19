"""Which fast paths a run fell back from, and why: one warning each, and a record for ``results.json``.

A self-check (a fused kernel against the reference form, nvJPEG against CPU decoding) that fails calls
:func:`record`; the run continues on the slower, correct path and the trainer writes :func:`recorded`
into ``results.json`` under ``"fallbacks"``.
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


def clear() -> None:
    """Forget the records (tests)."""
    _RECORDS.clear()
