"""Bad images: what counts as one, how skipped ones travel with a batch, and the skip budget.

Only a failure to read or decode a file is a bad image. Loaders decode in full (``open_image``) and
transforms that decode themselves (the fast pipeline) raise :class:`DecodeError`; the dataset turns either
into ``BadImageError`` naming the file. Errors in a transform's own work, a config or the code propagate
as what they are, under every policy.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from PIL import Image, UnidentifiedImageError

# What reading or decoding an image file raises (PIL: OSError for truncated data, SyntaxError for broken
# chunks, ValueError for impossible headers; torchvision.io: RuntimeError).
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)
FILES_LISTED = 100  # skipped files kept per split for results.json


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded; the message names the file."""


class DecodeError(OSError):
    """Raised by a transform whose decoding of the bytes it was given failed (the dataset adds the path)."""


@contextlib.contextmanager
def decoding() -> Iterator[None]:
    """Mark a block that decodes image bytes: its failures become :class:`DecodeError`."""
    try:
        yield
    except DecodeError:
        raise
    except (*DECODE_ERRORS, RuntimeError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e


class SkippedImage(NamedTuple):
    """A sample dropped under ``data.bad_image_policy=skip``."""

    path: str
    reason: str


def load_or_skip(load: Callable[[int], Any], index: int, path: str, policy: str) -> Any:
    """``load(index)``; a :class:`BadImageError` is raised under ``policy="raise"``, else warned about and
    returned as a :class:`SkippedImage` of ``path`` for the collate function to count."""
    try:
        return load(index)
    except BadImageError as e:
        if policy == "raise":
            raise
        warnings.warn(f"skipping bad image: {e}", stacklevel=3)
        return SkippedImage(path, str(e))


class BadImages(int):
    """The number of bad images skipped in one batch, with their files (``.files``)."""

    files: tuple[str, ...]

    def __new__(cls, files: tuple[str, ...] | list[str] = ()) -> BadImages:
        obj = super().__new__(cls, len(files))
        obj.files = tuple(files)
        return obj

    def __reduce__(self):
        return (BadImages, (self.files,))


def split_batch(batch: list, allow_empty: bool = False) -> tuple[list, BadImages]:
    """(the good samples, the skipped ones). A batch with nothing readable raises, unless ``allow_empty``:
    then the caller yields ``(None, None, BadImages)`` and the trainer skips that step on every rank."""
    good, skipped = [], []
    for b in batch:
        if b is None or isinstance(b, SkippedImage):
            skipped.append(b.path if b is not None else "<unknown file>")
        else:
            good.append(b)
    if not good and not allow_empty:
        names = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        raise BadImageError(f"every image in a batch of {len(batch)} failed to decode: {names}")
    return good, BadImages(skipped)


def default_budget(split_size: int | None) -> int:
    """0.1 % of the split, at least 1."""
    return max(1, (split_size or 0) // 1000)


class SkipLog:
    """The distinct files skipped per split, checked against ``data.max_bad_images``.

    ``store`` (split -> list of files) is kept by the caller, e.g. in the checkpointed run state.
    """

    def __init__(self, store: dict, sizes: dict[str, int | None], max_bad: int | None) -> None:
        self.store, self.seen = store, {k: set(v) for k, v in store.items()}
        self.count = {k: len(v) for k, v in store.items()}
        self.limits = {k: default_budget(n) if max_bad is None else int(max_bad) for k, n in sizes.items()}
        self.max_bad = max_bad

    def add(self, split: str, files) -> None:
        """Record ``files`` (a BadImages or a list) skipped in ``split``; raise past the budget."""
        seen, listed = self.seen.setdefault(split, set()), self.store.setdefault(split, [])
        for f in getattr(files, "files", files) or ():
            if f in seen:
                continue
            seen.add(f)
            self.count[split] = self.count.get(split, 0) + 1
            if len(listed) < FILES_LISTED:
                listed.append(f)
        limit = self.limits.get(split, 1)
        if self.count.get(split, 0) > limit:
            setting = (
                f"data.max_bad_images={self.max_bad}"
                if self.max_bad is not None
                else (f"the default data.max_bad_images (0.1 % of the split, at least 1: {limit})")
            )
            first = ", ".join(listed[:5]) + (", ..." if len(listed) > 5 else "")
            raise BadImageError(
                f"{self.count[split]} bad images in the {split} split, more than {setting}; first: {first}"
            )
