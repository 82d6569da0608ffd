"""The decode cache: a folder's decoded pixels, written once, mapped by every stage, run and torchrun rank.

    CACHE_DIR/images/<key>.npy        (N, C, H, W) uint8 of the readable files, in file order
    CACHE_DIR/images/<key>.json       facts: root, pixel rules, file count, shape, unreadable files
    CACHE_DIR/images/<key>.rows.npy   (N, 16) uint8: each image's blake2b-128 digest, so a stage can
                                      fingerprint a split's content without reading its pixels
    CACHE_DIR/images/<key>.sums.npy   (N, C, 2) int64: each image's per-channel sum and sum of squares,
                                      so data.normalize dataset is exact for any split without reading it

The key is the sha256 of the pixel rules (`DecodeOptions.pixel_rules`: image_size, resize, the
rules' version) and of the folder's listing: each file's path relative to data.root, size and
mtime. A changed, added or removed file makes another key, so a changed folder is decoded again;
a moved folder keeps its key. The files are written under a temporary name, fsynced and renamed,
the pixels' .npy last: an .npy under its final name is complete, and a killed writer
leaves only a temporary file that nothing reads. A lock file per key makes a second writer (another
stage, run or rank started meanwhile) wait and map instead of decoding; where locks do not work
(some network file systems) both decode and the last rename wins, each file complete and equal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptft.console import note
from ptft.data import residency
from ptft.data.decoding import Decoded, DecodeOptions, decode_files
from ptft.durable import fsync_path
from ptft.errors import DataError

FORMAT_VERSION = 1  # of the cache files themselves
DIGEST_BYTES = 16  # of each image's row digest: blake2b-128, collisions out of reach
DIGEST_CHUNK_BYTES = 1 << 26  # pixels read at a time while computing row digests
SUMS_CHUNK_BYTES = 1 << 24  # pixels read at a time while summing rows (held 4x, as int32)


@dataclass
class CachedFolder:
    """A folder's decoded pixels, what could not be read, and a digest of each image."""

    images: np.ndarray  # (K, C, H, W) uint8 of the K readable files, in file order
    bad: dict[int, str]  # index into the files -> why that file is unreadable
    row_digests: np.ndarray  # (K, DIGEST_BYTES) uint8: row_digests[i] identifies images[i]'s pixels
    row_sums: np.ndarray  # (K, C, 2) int64: images[i]'s per-channel sum and sum of squares


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ptft, else ~/.cache/ptft: per user, outside every run directory."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ptft"


def cached_decode(files: list[str | Path], root: Path, options: DecodeOptions,
                  cache_dir: str | Path | None = None) -> CachedFolder:
    """The pixels of `files` (as `decode_files` makes them) from the cache, decoding and caching them on a miss.

    Returns:
        CachedFolder: the images memory-mapped copy-on-write when cached, and registered with
        `ptft.data.residency` so that batches read from them do not make the mapping resident.

    Raises:
        DataError: as `decode_files`; an unreadable file recorded in the cache also raises unless
            `options.skip_bad_files`.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    started = time.perf_counter()
    key = folder_key(files, root, options)
    npy, facts_path = folder / "images" / f"{key}.npy", folder / "images" / f"{key}.json"
    hit = _mapped(npy, facts_path, root, options)
    if hit is None:
        with _locked(folder / "images" / f"{key}.lock"):
            hit = _mapped(npy, facts_path, root, options)  # another process may have written it while we waited
            if hit is None:
                return _decode_and_write(files, root, options, npy, facts_path)
    note(f"mapped cache {npy} ({len(hit.images)} images) in {time.perf_counter() - started:.1f}s")
    return hit


def folder_key(files: list[str | Path], root: Path, options: DecodeOptions) -> str:
    """sha256 hex of the pixel rules and of each file's relative path, size and mtime."""
    digest = hashlib.sha256(f"ptft-decode-cache:{FORMAT_VERSION}:".encode())
    digest.update(json.dumps(options.pixel_rules(), sort_keys=True).encode())
    prefix = "" if str(root) == "." else str(root) + os.sep  # Path("." ) / "a" is "a"
    for path in map(str, files):
        try:
            stat = os.stat(path)
            facts = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:  # a broken link: decoding names it as unreadable (or skips it)
            facts = "missing"
        # String slicing, not Path.relative_to: a hit on a large folder is timed in these microseconds.
        relative = path[len(prefix):] if path.startswith(prefix) else str(Path(path).relative_to(root))
        digest.update(f"\n{relative.replace(os.sep, '/')}\0{facts}".encode())
    return digest.hexdigest()


def row_digests(images: np.ndarray) -> np.ndarray:
    """(N, DIGEST_BYTES) uint8: the blake2b-128 of each image's bytes, read a chunk of rows at a time."""
    out = np.empty((len(images), DIGEST_BYTES), dtype=np.uint8)
    rows_per_chunk = max(1, DIGEST_CHUNK_BYTES // max(1, images[0].nbytes if len(images) else 1))
    for start in range(0, len(images), rows_per_chunk):
        chunk = np.ascontiguousarray(images[start:start + rows_per_chunk])
        out[start:start + len(chunk)] = np.frombuffer(
            b"".join(hashlib.blake2b(row.data, digest_size=DIGEST_BYTES).digest() for row in chunk),
            dtype=np.uint8).reshape(len(chunk), DIGEST_BYTES)
    return out


def row_sums(images: np.ndarray) -> np.ndarray:
    """(N, C, 2) int64: each uint8 image's per-channel sum and sum of squares, read a chunk of rows at a time."""
    n, channels = images.shape[:2]
    out = np.empty((n, channels, 2), dtype=np.int64)
    rows_per_chunk = max(1, SUMS_CHUNK_BYTES // max(1, images[0].nbytes if n else 1))
    for start in range(0, n, rows_per_chunk):
        chunk = np.asarray(images[start:start + rows_per_chunk], dtype=np.int32)  # 255 ** 2 fits
        out[start:start + len(chunk), :, 0] = chunk.sum(axis=(2, 3), dtype=np.int64)
        out[start:start + len(chunk), :, 1] = (chunk * chunk).sum(axis=(2, 3), dtype=np.int64)
    return out


def _mapped(npy: Path, facts_path: Path, root: Path, options: DecodeOptions) -> CachedFolder | None:
    """The cached folder of a complete entry, or None when there is none (or it is damaged)."""
    try:
        facts = json.loads(facts_path.read_text())
        images = np.load(npy, mmap_mode="c")  # raises on a file shorter than its header says
    except (OSError, ValueError):
        return None
    if list(images.shape) != facts.get("shape") or images.dtype != np.uint8:
        return None
    # Messages name the files where they were when decoded: name them where they are now.
    bad = {int(i): reason.replace(facts["root"], str(root)) for i, reason in facts["bad"].items()}
    if bad and not options.skip_bad_files:
        raise DataError(bad[min(bad)])
    residency.track(images)
    return _with_row_facts(npy, images, bad)


def _with_row_facts(npy: Path, images: np.ndarray, bad: dict[int, str]) -> CachedFolder:
    """The entry with its row digests and sums; an entry written before they existed gets them now, once."""
    facts = {}
    for name, compute, shape, dtype in (("rows", row_digests, (len(images), DIGEST_BYTES), np.uint8),
                                        ("sums", row_sums, (*images.shape[:2], 2), np.int64)):
        path = _row_facts_path(npy, name)
        try:
            facts[name] = np.load(path)
            if facts[name].shape == shape and facts[name].dtype == dtype:
                continue
        except (OSError, ValueError):
            pass
        facts[name] = compute(images)
        residency.release_all()  # that read every page of the cache
        with contextlib.suppress(OSError):  # a read-only cache still works: it computes them again next time
            _write_array(path, facts[name])
    return CachedFolder(images, bad, facts["rows"], facts["sums"])


def _row_facts_path(npy: Path, name: str) -> Path:
    return npy.with_name(f"{npy.stem}.{name}.npy")


def _decode_and_write(files: list, root: Path, options: DecodeOptions, npy: Path,
                      facts_path: Path) -> CachedFolder:
    decoded = decode_files(files, options, scratch=_scratch(npy.parent))
    facts = {"format_version": FORMAT_VERSION, "root": str(root), "folder": str(root.resolve()),
             "pixel_rules": options.pixel_rules(),
             "files": len(files), "shape": list(decoded.shape), "bad": {str(i): r for i, r in decoded.bad.items()}}
    try:
        _write_text(facts_path, json.dumps(facts, indent=1))
        _write_pixels(npy, decoded)
    except OSError as exc:
        note(f"decoded {len(files)} files in {decoded.seconds:.1f}s; could not cache them in {npy.parent} ({exc}), "
             "so the next stage decodes them again (set data.cache_dir to a writable folder)")
        images = decoded.array()
        return CachedFolder(images, decoded.bad, row_digests(images), row_sums(images))
    note(f"decoded {len(files)} files in {decoded.seconds:.1f}s, cached in {npy}")
    _remove_replaced(npy, facts)
    images = np.load(npy, mmap_mode="c")
    residency.track(images)
    return _with_row_facts(npy, images, decoded.bad)


def _scratch(folder: Path) -> Path | None:
    """The cache's folder for the decoding workers' chunk files (a large folder's pixels may not fit
    the system's temporary folder), or None for the default when it cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        return None


def _write_pixels(npy: Path, decoded: Decoded) -> None:
    temporary = _temporary_name(npy)
    try:
        # Straight into the file: the whole array is never held twice in memory.
        out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=decoded.shape)
        decoded.fill(out)
        out.flush()
        del out
        fsync_path(temporary)
        os.replace(temporary, npy)
        fsync_path(npy.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _write_array(path: Path, array: np.ndarray) -> None:
    temporary = _temporary_name(path)
    try:
        with temporary.open("wb") as out:
            np.save(out, array)
        fsync_path(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        temporary.write_text(text)
        fsync_path(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _temporary_name(path: Path) -> Path:
    # Unique per writer, so concurrent writers never share a temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _remove_replaced(npy: Path, facts: dict) -> None:
    """Delete the entries of an earlier state of the same folder with the same pixel rules, or with
    the same options under older rules (which no ptft of today reads again): the cache then holds
    one entry per (folder, options), not one per edit or upgrade. A process still mapping a deleted
    entry keeps reading it (the file lives until it is unmapped)."""
    for other in npy.parent.glob("*.json"):
        if other.stem == npy.stem:
            continue
        try:
            old = json.loads(other.read_text())
            if old.get("folder") == facts["folder"] and _superseded(old.get("pixel_rules"), facts["pixel_rules"]):
                other.with_suffix(".npy").unlink(missing_ok=True)  # the .npy first: a .json alone is never read
                for name in ("rows", "sums"):
                    _row_facts_path(other.with_suffix(".npy"), name).unlink(missing_ok=True)
                other.unlink(missing_ok=True)
                other.with_suffix(".lock").unlink(missing_ok=True)
        except (OSError, ValueError):
            continue


def _superseded(old: dict | None, new: dict) -> bool:
    """Whether pixels decoded by rules `old` are replaced by ones decoded by `new` (DecodeOptions.pixel_rules)."""
    if not isinstance(old, dict):
        return False
    same_options = {k: v for k, v in old.items() if k != "rules_version"} == \
        {k: v for k, v in new.items() if k != "rules_version"}
    return same_options and old.get("rules_version", 0) <= new["rules_version"]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if need be); without one, go ahead unlocked."""
    if multiprocessing.parent_process() is not None:
        # A multiprocessing child: maybe a decoding worker re-running an unguarded __main__ while its
        # parent holds this very lock. Unlocked, it reaches Python's own "if __name__ == '__main__'"
        # error instead of waiting forever; renames keep the cache sound either way.
        yield
        return
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except (ImportError, OSError):
        yield  # no locks here (or an unwritable cache): writers may both decode, renames stay atomic
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
