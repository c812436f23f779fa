"""docs/results.md holds one section per benchmark; each benchmark rewrites only its own, between markers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megaclone.checkpoint.manifest import atomic_write_text

HEADER = ("# Results\n\nMeasured by the scripts in `bench/`; each section is written by the script it names, which "
          "replaces only its own section when it is run again. Raw curves and plots are in `results/`.\n")


def write_section(path: Path, name: str, lines: list[str]) -> None:
    """Replace the section `name` of the markdown file `path`, atomically. A new section goes right after the
    last one of its benchmark (the name's first two words), so a hand-written reading that follows a
    benchmark's sections stays after them; the first section of a benchmark goes at the end."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = path.read_text() if path.is_file() else HEADER
    if begin not in text:
        text = text if "<!-- begin " in text else HEADER  # a file from before the sections: keep only the header
        family = "<!-- end " + "_".join(name.split("_")[:2])
        at = text.rfind(family)
        if at < 0:
            text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
        else:
            at = text.index("-->", at) + len("-->")
            text = f"{text[:at]}\n\n{begin}\n{end}{text[at:]}"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    body = "\n".join(lines).strip("\n")
    atomic_write_text(path, f"{head}{begin}\n{body}\n{end}{tail}")


def save_png(fig: Any, path: Path) -> None:
    """Write a matplotlib figure to `path` under a temporary name, renamed when complete."""
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
