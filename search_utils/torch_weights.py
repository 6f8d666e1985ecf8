"""Read PyTorch ``.pth`` state dicts into numpy arrays, without PyTorch.

PyTorch writes a state dict in one of two layouts:

legacy (torch < 1.6)
    Five pickles back to back: the magic number, the protocol version
    (1001), a system-info dict, the state dict itself and the list of storage
    keys; then, for each key in that list, the storage as an int64
    little-endian element count followed by its raw little-endian elements.
zip (torch >= 1.6)
    A zip archive with ``<archive>/data.pkl`` (the state dict),
    ``<archive>/data/<key>`` (one raw storage each) and optionally
    ``<archive>/byteorder`` ("little" or "big").

In both, a tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`` and its storage as a persistent id naming the
storage type (``torch.FloatStorage``...), key and element count.

Unpickling untrusted data can run arbitrary code, so the unpickler here
resolves only the handful of globals a plain state dict needs, each to a
harmless stand-in of ours, and refuses everything else.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class TorchWeightsError(ValueError):
    """A file is not a readable, plain PyTorch state dict."""


class _Sealed:
    """Refuses pickle's BUILD: the stand-ins are shared by every load, so a
    hostile file must not be able to alter them for the next one."""

    __slots__ = ()

    def __setstate__(self, state):
        raise TorchWeightsError(f"a pickle tried to modify {self!r}: not a plain state dict")


class _StorageType(_Sealed):
    """Stand-in for a ``torch.<Type>Storage`` class: just its element type."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = dtype  # little-endian, as stored on disk

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Function(_Sealed):
    """Stand-in for a torch function: calls ours instead."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function: Callable[..., Any]):
        self.name = name
        self.function = function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __repr__(self) -> str:
        return self.name


# Element types as written to disk. numpy has no bfloat16: such storages are
# read as their raw 16 bits and widened to float32 afterwards (exactly).
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",
    "LongStorage": "<i8",  # always 8 bytes, whatever sys_info says about long
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16",
}


@dataclass(frozen=True)
class _StorageRef(_Sealed):
    """A storage named by a persistent id; its bytes are read separately."""

    key: str
    type: _StorageType
    numel: int
    view: tuple[int, int] | None = None  # legacy storage views: (offset, numel)


@dataclass(frozen=True)
class _TensorRecord(_Sealed):
    """What ``_rebuild_tensor_v2`` was asked to build, materialised later
    (in the legacy layout the storages come after the pickle)."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorRecord:
    # requires_grad, backward hooks and metadata mean nothing to numpy.
    if not isinstance(storage, _StorageRef):
        raise TorchWeightsError("a tensor's storage is not a storage reference")
    return _TensorRecord(storage, _to_int(storage_offset), _ints(size), _ints(stride))


def _rebuild_parameter(data, *_ignored):
    # An nn.Parameter is its tensor plus requires_grad and hooks.
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for name, function in (
        ("_rebuild_tensor_v2", _rebuild_tensor),
        ("_rebuild_parameter", _rebuild_parameter),
        ("_rebuild_parameter_with_state", _rebuild_parameter),
    ):
        allowed[("torch._utils", name)] = _Function(f"torch._utils.{name}", function)
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, np.dtype(dtype))
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that knows only the globals of a plain state dict."""

    def __init__(self, file: BinaryIO, path: str, persistent: Callable[[Any], Any] | None):
        super().__init__(file)
        self._path = path
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TorchWeightsError(
                f"refusing to load {module}.{name} from {self._path}: not a plain state dict"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise TorchWeightsError(f"{self._path}: unexpected storage reference in a header")
        return self._persistent(pid)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file (legacy or zip layout) without torch.

    Returns:
        The tensors by name, in file order, as contiguous native-endian numpy
        arrays (bfloat16 widened to float32).

    Raises:
        TorchWeightsError: the file is truncated, is not a PyTorch file, or
            holds anything beyond plain tensors (one-line message).
        OSError: the file can't be opened.
    """
    path = str(path)
    with open(path, "rb") as file:
        try:
            if zipfile.is_zipfile(file):
                return _load_zip(file, path)
            file.seek(0)
            return _load_legacy(file, path)
        except TorchWeightsError as error:
            if path in str(error):
                raise
            raise TorchWeightsError(f"{path}: {error}") from None
        except Exception as error:  # any parse failure is a bad file
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise TorchWeightsError(
                f"{path} is not a readable PyTorch state dict ({type(error).__name__}: {reason})"
            ) from None


# ---- legacy layout --------------------------------------------------------


def _load_legacy(file: BinaryIO, path: str) -> dict[str, np.ndarray]:
    _check_legacy_header(file, path)
    refs: dict[str, _StorageRef] = {}
    state = _SafeUnpickler(file, path, lambda pid: _legacy_storage(pid, refs)).load()
    records = _tensor_records(state, path)
    keys = _SafeUnpickler(file, path, None).load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TorchWeightsError(f"{path}: the storage key list is malformed")
    missing = sorted(set(refs) - set(keys))
    if missing:
        raise TorchWeightsError(f"{path}: storage {missing[0]} is used but not in the file")
    storages = {}
    for key in keys:
        if key not in refs:
            raise TorchWeightsError(f"{path}: storage {key} is listed but never used")
        storages[key] = _read_legacy_storage(file, refs[key], path)
    return {name: _materialize(record, storages, path, name) for name, record in records.items()}


def _check_legacy_header(file: BinaryIO, path: str) -> None:
    try:
        magic = _SafeUnpickler(file, path, None).load()
    except TorchWeightsError:
        raise
    except Exception:
        raise TorchWeightsError(
            f"{path} is not a PyTorch .pth file (neither zip nor legacy pickle)"
        ) from None
    if magic != LEGACY_MAGIC:
        raise TorchWeightsError(f"{path} is not a PyTorch .pth file (wrong magic number)")
    protocol = _SafeUnpickler(file, path, None).load()
    if protocol != LEGACY_PROTOCOL:
        raise TorchWeightsError(f"{path}: unsupported legacy protocol version {protocol!r}")
    # The system info only describes the saving machine: the storages are
    # little-endian with 8-byte counts regardless (its "long" may say 4).
    if not isinstance(_SafeUnpickler(file, path, None).load(), dict):
        raise TorchWeightsError(f"{path}: malformed system info")


def _legacy_storage(pid: Any, refs: dict[str, _StorageRef]) -> _StorageRef:
    # ('storage', type, root_key, location, root_numel, view_metadata)
    if not (isinstance(pid, tuple) and len(pid) == 6 and _text(pid[0]) == "storage"):
        raise TorchWeightsError(f"unsupported persistent id {_describe(pid)}: not a plain state dict")
    _, storage_type, key, _location, numel, view = pid
    key = _checked_storage(storage_type, key, numel)
    root = refs.setdefault(key, _StorageRef(key, storage_type, _to_int(numel)))
    if root.type != storage_type or root.numel != _to_int(numel):
        raise TorchWeightsError(f"storage {key} is described two different ways")
    if view is None:
        return root
    # (view_key, offset, view_numel): a slice of the root storage.
    _view_key, offset, view_numel = view
    return _StorageRef(key, storage_type, root.numel, (_to_int(offset), _to_int(view_numel)))


def _read_legacy_storage(file: BinaryIO, ref: _StorageRef, path: str) -> np.ndarray:
    (count,) = struct.unpack("<q", _read_exact(file, 8, path))
    if count != ref.numel:
        raise TorchWeightsError(
            f"{path}: storage {ref.key} holds {count} elements, the pickle said {ref.numel}"
        )
    size = count * ref.type.dtype.itemsize
    # Compare with what is left before reading: a forged count must not make
    # read() allocate gigabytes.
    left = os.fstat(file.fileno()).st_size - file.tell()
    if size > left:
        raise TorchWeightsError(f"{path} is truncated: storage {ref.key} needs {size} bytes, {left} are left")
    data = _read_exact(file, size, path)
    return np.frombuffer(data, dtype=ref.type.dtype)


def _read_exact(file: BinaryIO, size: int, path: str) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise TorchWeightsError(f"{path} is truncated: wanted {size} more bytes, found {len(data)}")
    return data


# ---- zip layout -----------------------------------------------------------


def _load_zip(file: BinaryIO, path: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(file) as archive:
        prefix = _zip_prefix(archive, path)
        byteorder = "<"
        if prefix + "byteorder" in archive.namelist():
            byteorder = ">" if archive.read(prefix + "byteorder").strip() == b"big" else "<"
        refs: dict[str, _StorageRef] = {}
        with archive.open(prefix + "data.pkl") as pickled:
            state = _SafeUnpickler(pickled, path, lambda pid: _zip_storage(pid, refs)).load()
        records = _tensor_records(state, path)
        storages = {
            key: _read_zip_storage(archive, prefix, ref, byteorder, path) for key, ref in refs.items()
        }
    return {name: _materialize(record, storages, path, name) for name, record in records.items()}


def _zip_prefix(archive: zipfile.ZipFile, path: str) -> str:
    # The top folder is named after the file when saved; it varies.
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise TorchWeightsError(f"{path} is a zip file but not a PyTorch one (no single */data.pkl)")
    return pickles[0][: -len("data.pkl")]


def _zip_storage(pid: Any, refs: dict[str, _StorageRef]) -> _StorageRef:
    # ('storage', type, key, location, numel)
    if not (isinstance(pid, tuple) and len(pid) == 5 and _text(pid[0]) == "storage"):
        raise TorchWeightsError(f"unsupported persistent id {_describe(pid)}: not a plain state dict")
    _, storage_type, key, _location, numel = pid
    key = _checked_storage(storage_type, key, numel)
    ref = refs.setdefault(key, _StorageRef(key, storage_type, _to_int(numel)))
    if ref.type != storage_type or ref.numel != _to_int(numel):
        raise TorchWeightsError(f"storage {key} is described two different ways")
    return ref


def _read_zip_storage(archive, prefix: str, ref: _StorageRef, byteorder: str, path: str) -> np.ndarray:
    name = f"{prefix}data/{ref.key}"
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise TorchWeightsError(f"{path}: storage {name} is missing") from None
    wanted = ref.numel * ref.type.dtype.itemsize
    # Check the declared size first: never inflate more than we need.
    if info.file_size < wanted:
        raise TorchWeightsError(f"{path}: storage {name} has {info.file_size} bytes, needs {wanted}")
    with archive.open(info) as member:
        data = _read_exact(member, wanted, path)
    return np.frombuffer(data, dtype=ref.type.dtype.newbyteorder(byteorder))


# ---- shared ---------------------------------------------------------------


def _tensor_records(state: Any, path: str) -> dict[str, _TensorRecord]:
    if not isinstance(state, dict):
        raise TorchWeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRecord):
            raise TorchWeightsError(
                f"{path}: entry {name!r} is not a tensor but {type(value).__name__}: not a plain state dict"
            )
    return dict(state)


def _materialize(record: _TensorRecord, storages: dict[str, np.ndarray], path: str, name: str) -> np.ndarray:
    """The tensor as a contiguous array: offset, size and stride applied."""
    storage = storages[record.storage.key]
    if record.storage.view is not None:
        view_offset, view_numel = record.storage.view
        if view_offset < 0 or view_numel < 0 or view_offset + view_numel > storage.size:
            raise TorchWeightsError(f"{path}: tensor {name} has a storage view out of bounds")
        storage = storage[view_offset : view_offset + view_numel]
    size, stride, offset = record.size, record.stride, record.offset
    if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
        raise TorchWeightsError(f"{path}: tensor {name} has a malformed size/stride {size}/{stride}")
    if 0 in size:
        return np.zeros(size, dtype=_native(storage.dtype))
    # Check the last element is inside the storage before striding over it:
    # as_strided itself would happily read past the end of the buffer.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise TorchWeightsError(f"{path}: tensor {name} reaches past the end of its storage")
    itemsize = storage.dtype.itemsize
    strided = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
    )
    array = np.array(strided, dtype=_native(storage.dtype), order="C")  # a copy we own
    if record.storage.type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _checked_storage(storage_type: Any, key: Any, numel: Any) -> str:
    if not isinstance(storage_type, _StorageType):
        raise TorchWeightsError(f"storage type {_describe(storage_type)} is not supported")
    if _to_int(numel) < 0:
        raise TorchWeightsError(f"storage {_text(key)} has a negative size")
    return _text(key)


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=")


def _text(value: Any) -> str:
    # Files written from Python 2 may carry bytes where Python 3 has str.
    if isinstance(value, bytes):
        return value.decode("ascii")
    if isinstance(value, (str, int)):
        return str(value)
    raise TorchWeightsError(f"expected a name, found {_describe(value)}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TorchWeightsError(f"expected an integer, found {_describe(value)}")
    return value


def _ints(values: Any) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)):
        raise TorchWeightsError(f"expected a tuple of integers, found {_describe(values)}")
    return tuple(_to_int(v) for v in values)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {str(value)[:60]}"
