"""``data.class_subset``: train and evaluate on a fixed subset of the classes of an ImageNet-layout dataset.

The value is a shipped list's name (``imagenet100``: the 100 classes of Tian et al., "Contrastive
Multiview Coding", ``acon/data/imagenet100.txt``) or the path of a text file of WordNet ids, one a line
(``#`` starts a comment). Labels are the subset's classes in sorted order, as an ImageFolder of only those
folders would number them. A malformed or repeated id, or one missing from the data, stops the run before
any image is read, naming the file and line or the folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from acon.errors import ConfigError
from acon.release import optional

SUBSETS = {"imagenet100": Path(__file__).with_name("imagenet100.txt")}
WNID = re.compile(r"n\d{8}")


def subset_file(value: str) -> Path:
    """The file of ``data.class_subset``: a shipped list's name or a path."""
    if value in SUBSETS:
        return SUBSETS[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"data.class_subset={value!r} is neither a shipped list ({', '.join(SUBSETS)}) nor a file"
        )
    return path


def read_subset(value: str) -> list[str]:
    """The subset's WordNet ids, sorted; a malformed or repeated id is a :class:`ConfigError` naming its line."""
    path, seen = subset_file(value), {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        wnid = line.split("#", 1)[0].strip()
        if not wnid:
            continue
        if not WNID.fullmatch(wnid):
            raise ConfigError(
                f"data.class_subset={value!r}: {path}:{n}: {wnid!r} is not a WordNet id (n + 8 digits)"
            )
        if wnid in seen:
            raise ConfigError(f"data.class_subset={value!r}: {path}:{n}: {wnid} repeats line {seen[wnid]}")
        seen[wnid] = n
    if not seen:
        raise ConfigError(f"data.class_subset={value!r}: {path} lists no class")
    return sorted(seen)


def select_classes(found: list[str], value: str, where: str | Path) -> list[str]:
    """The subset's classes, after checking that every one of them is among ``found`` (the folders or shard
    classes at ``where``)."""
    wanted = read_subset(value)
    missing = sorted(set(wanted) - set(found))
    if missing:
        more = "…" if len(missing) > 10 else ""
        raise ConfigError(
            f"data.class_subset={value!r} ({subset_file(value)}): {len(missing)} of its {len(wanted)} classes "
            f"are not in {where}: {missing[:10]}{more}"
        )
    return wanted


def data_label(data) -> str:
    """The dataset's name in results and tables: ``data.name``, plus ``[subset]`` when a class subset is set
    and the name does not already say it (``imagenet[imagenet100]``)."""
    name, subset = str(data.name), optional(data, "class_subset")
    if not subset:
        return name
    tag = Path(str(subset)).stem
    return name if tag in name else f"{name}[{tag}]"
