"""INPUT arguments -> the ordered list of images to run: files, folders, globs and `-` (stdin).

Folders are searched at any depth in sorted order; a folder whose subfolders are named after
the model's classes labels each image by the subfolder it is in (`true`). Paths given on the
command line must exist (a typo stops the command before any output); paths read from stdin
are taken as they come, and one that cannot be read becomes an error record.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ptft.data.sources import IMAGE_SUFFIXES, _image_paths
from ptft.errors import UserError

STDIN = "-"
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class Item:
    """One input: where it comes from, and its true class index when the input says so."""

    path: str
    true: int | None = None


def expand_inputs(args: list[str], class_names: tuple[str, ...], stdin: TextIO | None = None) -> list[Item]:
    """Every image the arguments name, in the order given (folders and globs sorted).

    Raises:
        UserError: no arguments, a path that does not exist, a folder without images, or a
            pattern that matches no image (each names the argument).
    """
    if not args:
        raise UserError("INPUT: give image files, folders, globs or '-' (paths on stdin), or --split test|val")
    items: list[Item] = []
    for arg in args:
        if arg == STDIN:
            items += [Item(line.strip()) for line in (stdin or sys.stdin) if line.strip()]
        elif Path(arg).is_dir():
            items += _folder_items(Path(arg), class_names)
        elif Path(arg).exists():
            items.append(Item(arg))
        elif any(c in arg for c in GLOB_CHARACTERS):
            items += _glob_items(arg)
        else:
            raise UserError(f"INPUT '{arg}': no such file or folder")
    return items


def _folder_items(folder: Path, class_names: tuple[str, ...]) -> list[Item]:
    files = _folder_files(folder)
    if not files:
        raise UserError(f"INPUT '{folder}': no images in this folder or below it (looked for files ending in "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    labels = _class_folders(folder, class_names)
    if not labels:
        return [Item(path) for path in files]
    inside = 0 if folder == Path(".") else len(os.path.join(folder, ""))  # where a path's first subfolder starts
    return [Item(path, labels.get(path[inside:].split(os.sep, 1)[0])) for path in files]


def _folder_files(folder: Path) -> list[str]:
    """Regular image files under `folder`, sorted, named as Path names them ('a.png' in '.', not './a.png').

    Plain strings: a Path per file costs more than listing the folder does. A broken link or a
    FIFO named *.png is no input (opening a FIFO would block).
    """
    files = [path for path in _image_paths(folder) if os.path.isfile(path)]
    return [path[2:] for path in files] if folder == Path(".") else files


def _class_folders(folder: Path, class_names: tuple[str, ...]) -> dict[str, int]:
    """Subfolder name -> class index, when every subfolder is one of the model's classes."""
    subfolders = {entry.name for entry in folder.iterdir() if entry.is_dir()}
    if not subfolders or not subfolders <= set(class_names):
        return {}
    return {name: class_names.index(name) for name in subfolders}


def _glob_items(pattern: str) -> list[Item]:
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"INPUT '{pattern}': no image files match this pattern")
    return [Item(str(p)) for p in files]
