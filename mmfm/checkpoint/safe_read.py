"""Reading a DCP checkpoint without running code from its files.

torch.distributed.checkpoint keeps its `.metadata` as a pickle and reads non-tensor values (optimizer
hyper-parameters, ...) with `torch.load(weights_only=False)`: a crafted checkpoint could run any command
while it loads. Here the metadata goes through an unpickler that builds only DCP's own metadata classes,
torch sizes, dtypes and layouts; non-tensor values load with `weights_only=True`; and every data file the
metadata names must be a plain file name inside the checkpoint folder.
"""

from __future__ import annotations

import collections
import pickle
import re
from pathlib import Path, PurePosixPath, PosixPath

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from mmfm.checkpoint.errors import CheckpointError

METADATA = ".metadata"


class UnsafeCheckpoint(CheckpointError):
    pass


_DCP_CLASSES = {name: getattr(dcp_metadata, name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING") if hasattr(dcp_metadata, name)}

ALLOWED = {
    "torch.distributed.checkpoint.metadata": _DCP_CLASSES,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo": _StorageInfo},
    "torch": {"Size": torch.Size},
    "torch.serialization": {"_get_layout": torch.serialization._get_layout},
    "pathlib": {"PosixPath": PosixPath, "PurePosixPath": PurePosixPath},
    "collections": {"OrderedDict": collections.OrderedDict},
}


class MetadataUnpickler(pickle.Unpickler):
    """Builds only the allow-listed classes above and torch dtypes; anything else is refused."""

    def find_class(self, module: str, name: str):
        allowed = ALLOWED.get(module, {})
        if name in allowed:
            return allowed[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata class")


def plain_file_name(name) -> bool:
    """A file name of a checkpoint's own folder: no directory part, no '..', no backslash."""
    return isinstance(name, str) and name not in ("", ".", "..") and PurePosixPath(name).name == name and "\\" not in name


def _check_storage_paths(metadata, folder: str) -> None:
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not plain_file_name(name):
            raise UnsafeCheckpoint(f"checkpoint {folder}: {METADATA} names the data file {name!r}, which is not a "
                                   "plain file name inside the checkpoint folder; refusing to read it (use a "
                                   "checkpoint you trust)")


def read_metadata(folder: str | Path) -> dcp_metadata.Metadata:
    """The checkpoint's DCP metadata, read by the allow-listed unpickler; refused with one line otherwise."""
    path = Path(folder) / METADATA
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except OSError as exc:
        raise UnsafeCheckpoint(f"checkpoint {folder}: cannot read {METADATA} ({exc.strerror or exc}); resume from "
                               "another step_* folder") from None
    except Exception as exc:  # noqa: BLE001  (a refused class or any malformed pickle: refused the same way)
        detail = " ".join(str(exc).split())[:200]
        raise UnsafeCheckpoint(f"checkpoint {folder}: {METADATA} is not plain DCP metadata ({detail}); refusing to "
                               "load it: nothing from it was run; use a checkpoint you trust") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpoint(f"checkpoint {folder}: {METADATA} holds a {type(metadata).__name__}, not DCP "
                               "metadata; refusing to load it")
    _check_storage_paths(metadata, str(folder))
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata goes through read_metadata above."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (floats, ints, strings, containers of them) load with weights_only=True."""

    def load_bytes(self, read_item, value) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL [\w.]+", str(exc))
            raise UnsafeCheckpoint(f"the value of {read_item.dest_index.fqn} is not a plain number, string or tensor "
                                   f"({found.group(0) if found else 'a pickled object'}); refusing to load it: nothing "
                                   "from it was run; use a checkpoint you trust") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
