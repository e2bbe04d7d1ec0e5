"""Expand a recipe data source into the rows it holds: files, globs, folders, `save_to_disk` datasets,
fsspec URLs and hub datasets, all yielding chunks of `RawRow`s with their origin."""
from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from data_prep.readers import (
    SUPPORTED_SUFFIXES,
    DataError,
    RawChunk,
    RawRow,
    in_chunks,
    read_stream,
    suffix_of,
)
from recipes.schema import DataSource

GLOB_CHARS = "*?["


def iter_source(source: DataSource) -> Iterator[RawRow]:
    """Every row of a source, in a stable order (files sorted by name)."""
    for chunk in iter_chunks(source):
        yield from chunk.raw_rows()


def iter_chunks(source: DataSource, max_field_chars: int = 200_000) -> Iterator[RawChunk]:
    """The rows of a source a chunk at a time, in a stable order (files sorted by name); a CSV field longer than
    max_field_chars is a bad row."""
    if source.hub is not None:
        yield from in_chunks(_hub_rows(source))
        return
    path = source.path
    if "://" in path:
        yield from _remote_rows(path, storage_options(source), max_field_chars)
    elif _is_saved_dataset(Path(path)):
        yield from in_chunks(_dataset_rows(path, _load_from_disk(path)))
    else:
        for file in local_files(path):
            yield from read_stream(file, lambda file=file: open(file, "rb"), Path(file).stat().st_size, max_field_chars)


def storage_options(source: DataSource) -> dict:
    """fsspec options from a Prefect Secret block (JSON); without one, fsspec reads credentials from the environment."""
    if not source.credentials_block:
        return {}
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(source.credentials_block).get()
    except ValueError as exc:
        raise DataError(f"{source.path}: cannot load credentials block {source.credentials_block!r}: {exc}") from None
    options = json.loads(value) if isinstance(value, str) else value
    if not isinstance(options, dict):
        raise DataError(f"{source.path}: credentials block {source.credentials_block!r} must hold a JSON object of storage options")
    return options


def local_files(path: str) -> list[str]:
    if any(c in path for c in GLOB_CHARS):
        files = sorted(p for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{path}: the glob matches no files")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no {', '.join(SUPPORTED_SUFFIXES)} files")
        return files
    if not p.exists():
        raise DataError(f"{path}: file not found")
    return [path]


def _remote_rows(url: str, options: dict, max_field_chars: int) -> Iterator[RawChunk]:
    import fsspec

    try:
        fs, fs_path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise DataError(f"{url}: no filesystem for this URL ({exc}); install the fsspec backend (s3fs, gcsfs, adlfs)") from None
    try:
        if any(c in fs_path for c in GLOB_CHARS):
            paths = sorted(fs.glob(fs_path))
            if not paths:
                raise DataError(f"{url}: the glob matches no files")
        elif fs.isdir(fs_path):
            paths = sorted(p for p in fs.find(fs_path) if suffix_of(p) in SUPPORTED_SUFFIXES)
            if not paths:
                raise DataError(f"{url}: folder holds no {', '.join(SUPPORTED_SUFFIXES)} files")
        else:
            paths = [fs_path]
        for path in paths:
            name = fs.unstrip_protocol(path)
            size = fs.size(path)
            yield from read_stream(name, lambda path=path: fs.open(path, "rb"), size, max_field_chars)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{url}: file not found") from None
    except PermissionError as exc:
        raise DataError(f"{url}: access denied ({exc}); check the credentials") from None
    except Exception as exc:  # noqa: BLE001 - each backend raises its own (aiohttp, botocore, gcsfs): all mean "cannot read"
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DataError(f"{url}: cannot read it ({type(exc).__name__}: {message}); is the network reachable from here "
                        "and the URL right?") from None


def files_behind(path: str) -> list[str]:
    """The local files whose bytes make up a source (a saved dataset: every file of its folder)."""
    if _is_saved_dataset(Path(path)):
        return sorted(str(f) for f in Path(path).rglob("*") if f.is_file())
    return local_files(path)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def _load_from_disk(path: str):
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(path)
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: saved DatasetDict has no 'train' split (has {', '.join(dataset)})")
        dataset = dataset["train"]
    return dataset


def _dataset_rows(name: str, dataset) -> Iterator[RawRow]:
    for number, record in enumerate(dataset, start=1):
        yield RawRow(name, number, record=record)


def _hub_rows(source: DataSource) -> Iterator[RawRow]:
    from datasets import load_dataset

    where = f"hub:{source.hub}"
    try:
        dataset = load_dataset(source.hub, revision=source.revision, split=source.split, streaming=True)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, hub errors)
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DataError(
            f"{where}: cannot load dataset {source.hub!r} (revision {source.revision or 'default'}, split {source.split!r}); "
            f"is the hub reachable (HF_HUB_OFFLINE unset) and the id right? {type(exc).__name__}: {message}"
        ) from None
    if first is None:
        return
    yield RawRow(where, 1, record=first)
    for number, record in enumerate(rows, start=2):
        yield RawRow(where, number, record=record)
