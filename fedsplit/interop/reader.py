"""Read fedsplit tensors, or row and column ranges of them, straight out of safetensors files.

Nothing is read that was not asked for: ``safe_open(...).get_slice(key)[index]`` copies just the
bytes of the requested rows and columns from the memory-mapped file, so an organisation that
holds one expert, or two heads of a layer, never materialises the whole model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from torch import Tensor

from ..model import ModelConfig, parameter_shapes
from .errors import CheckpointError
from .hf_weights import Stored

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SAMPLE = 64 * 1024  # bytes of tensor data at each end of a file that its identity hashes

# (fedsplit name, dim or None for the whole tensor, start, stop): the fields of a TensorSlice.
Request = tuple[str, int | None, int, int]


def safetensors_header(f: BinaryIO) -> bytes | None:
    """The JSON header of the safetensors file open as ``f`` (read from its start, leaving ``f``
    at the tensor data): an 8-byte little-endian length, then that many bytes. None when the file
    is too short for the header it declares (a length is never trusted to allocate)."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        return None
    (length,) = struct.unpack("<Q", head)
    return f.read(length) if length <= size - 8 else None


class SafetensorsFiles:
    """``model.safetensors``, or the shards that ``model.safetensors.index.json`` lists."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"not a safetensors index ({e})", file=index, field="weight_map") from None
            self.file_of = {key: self.directory / name for key, name in weight_map.items()}
        elif (self.directory / SINGLE_FILE).exists():
            with safe_open(self.directory / SINGLE_FILE, "pt") as f:
                self.file_of = {key: self.directory / SINGLE_FILE for key in f.keys()}
        else:
            raise CheckpointError(f"holds neither {SINGLE_FILE} nor {INDEX_FILE}", file=self.directory)
        for path in set(self.file_of.values()):
            if not path.exists():
                raise CheckpointError(f"the index names {path.name}, which does not exist", file=index)

    @property
    def keys(self) -> set[str]:
        return set(self.file_of)

    def identity(self) -> str:
        """A hash of every file's safetensors header (names, dtypes, shapes, offsets) and of the
        first and last 64 KiB of its tensor data: what tells two checkpoints apart, two of the
        same shapes included, without reading gigabytes of weights."""
        digest = hashlib.sha256()
        for path in sorted(set(self.file_of.values())):
            with open(path, "rb") as f:
                digest.update(path.name.encode() + (safetensors_header(f) or b"") + f.read(_SAMPLE))
                f.seek(max(f.tell(), path.stat().st_size - _SAMPLE))
                digest.update(f.read())
        return digest.hexdigest()[:16]


class CheckpointReader:
    """Reads a model's tensors by fedsplit name from where :func:`~.hf_weights.locate` (or an
    identity map, for fedsplit's own files) says they are stored. Tensors come back in fp32, the
    dtype fedsplit trains in."""

    def __init__(self, cfg: ModelConfig, files: SafetensorsFiles, where: Mapping[str, Stored | None]):
        self.cfg, self.files, self.where = cfg, files, dict(where)
        self.shapes = parameter_shapes(cfg)

    def read(self, requests: Iterable[Request]) -> list[Tensor]:
        """The requested tensors or slices, in order; each file is opened once."""
        requests = list(requests)
        out: list[Tensor | None] = [None] * len(requests)
        by_file: dict[Path, list[int]] = defaultdict(list)
        for i, (name, dim, start, stop) in enumerate(requests):
            if name not in self.where:
                raise CheckpointError(f"{name!r} is not a tensor of this model", field=name)
            stored = self.where[name]
            if stored is None:
                out[i] = _narrow_shape_zeros(self.shapes[name], dim, start, stop)
            else:
                by_file[self.files.file_of[stored.key]].append(i)
        for path, indices in by_file.items():
            with safe_open(path, "pt") as f:
                for i in indices:
                    name, dim, start, stop = requests[i]
                    out[i] = self._read_one(f, path, name, dim, start, stop)
        return out  # type: ignore[return-value]

    def read_all(self) -> dict[str, Tensor]:
        names = list(self.shapes)
        return dict(zip(names, self.read((n, None, 0, 0) for n in names)))

    def check_shapes(self) -> None:
        """Every stored tensor has the shape the config implies (read from the files' headers,
        no weights): a checkpoint of another model is refused when it is opened, by tensor."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name, stored in self.where.items():
            if stored is not None:
                by_file[self.files.file_of[stored.key]].append(name)
        for path, names in by_file.items():
            with safe_open(path, "pt") as f:
                for name in names:
                    self._locate(f, path, name)

    def _locate(self, f, path: Path, name: str):
        """The stored view of ``name`` and the index that selects it, its shape checked."""
        stored = self.where[name]
        view = f.get_slice(stored.key)
        index, shape = _compose(stored.index, list(view.get_shape()))
        if tuple(shape) != tuple(self.shapes[name]):
            raise CheckpointError(
                f"{stored.key!r} has shape {tuple(shape)} where the config implies "
                f"{tuple(self.shapes[name])} for {name}",
                file=path,
                field=stored.key,
            )
        return view, index

    def _read_one(self, f, path: Path, name: str, dim: int | None, start: int, stop: int) -> Tensor:
        view, index = self._locate(f, path, name)
        if dim is not None:
            index = _narrow(index, dim, start, stop)
        return view[tuple(index)].to(torch.float32).contiguous()


def _compose(prefix: tuple[int | slice, ...], stored_shape: list[int]) -> tuple[list[int | slice], list[int]]:
    """The full index of a stored tensor given its leading ``prefix``, and the shape it selects."""
    index: list[int | slice] = list(prefix) + [slice(0, n) for n in stored_shape[len(prefix) :]]
    shape = []
    for entry, n in zip(index, stored_shape):
        if isinstance(entry, slice):
            shape.append(len(range(*entry.indices(n))))
    return index, shape


def _narrow(index: list[int | slice], dim: int, start: int, stop: int) -> list[int | slice]:
    """Restrict output dimension ``dim`` of ``index`` to ``[start, stop)``."""
    positions = [p for p, entry in enumerate(index) if isinstance(entry, slice)]
    p = positions[dim]
    base = index[p].start or 0
    return [*index[:p], slice(base + start, base + stop), *index[p + 1 :]]


def _narrow_shape_zeros(shape: torch.Size, dim: int | None, start: int, stop: int) -> Tensor:
    size = list(shape)
    if dim is not None:
        size[dim] = stop - start
    return torch.zeros(size)
