"""arat_tf.interop.torch_checkpoint: torch.save zip files read as data, without torch and without unpickling."""

import collections
import pathlib
import pickle
import pickletools
import struct
import zipfile

import numpy as np
import pytest
from torch_zip_writer import BFloat16, hostile_pickle, state_dict_pickle, write_raw_torch_zip, write_torch_zip

from arat_tf.interop.torch_checkpoint import TorchCheckpointError, read_state_dict

DATA = pathlib.Path(__file__).resolve().parent / "data" / "arat_official"
MODEL_PT = DATA / "r18_w0125_init_state_dict.pt"
PREDICTORS_PT = DATA / "r18_w0125_predictors_state_dict.pt"
NPZ = DATA / "r18_w0125_init_state.npz"


@pytest.fixture(scope="module")
def reference():
    with np.load(NPZ) as npz:
        return collections.OrderedDict((key, npz[key]) for key in npz.files)


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the reader must not unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)


def _assert_same(result, expected):
    assert isinstance(result, collections.OrderedDict)
    assert list(result) == list(expected)
    for key, value in expected.items():
        assert result[key].dtype == value.dtype, key
        assert result[key].shape == value.shape, key
        np.testing.assert_array_equal(result[key], value, err_msg=key)


# Real files written by torch.save.


def test_real_model_file_matches_npz(reference, no_unpickling):
    result = read_state_dict(MODEL_PT)
    assert len(result) == 222
    _assert_same(result, collections.OrderedDict(list(reference.items())[:222]))
    assert result["conv1.weight"].dtype == np.float32 and result["conv1.weight"].shape == (8, 3, 3, 3)
    tracked = result["bn1.clean.num_batches_tracked"]
    assert tracked.dtype == np.int64 and tracked.shape == ()
    assert all(value.base is None and value.flags.writeable for value in result.values())


def test_real_predictors_file_matches_npz(reference, no_unpickling):
    result = read_state_dict(str(PREDICTORS_PT))
    assert len(result) == 32
    _assert_same(result, collections.OrderedDict(list(reference.items())[222:]))


def test_writer_reproduces_real_torch_pickle(reference):
    # The hand-assembled pickle matches torch's byte for byte, so the round trips below test real structure.
    predictors = collections.OrderedDict(list(reference.items())[222:])
    pickle_bytes, storages = state_dict_pickle(predictors, metadata=None)
    model = collections.OrderedDict(list(reference.items())[:222])
    model_bytes, _ = state_dict_pickle(model)
    with zipfile.ZipFile(PREDICTORS_PT) as archive:
        assert pickle_bytes == archive.read("r18_w0125_predictors_state_dict/data.pkl")
        assert storages["5"] == archive.read("r18_w0125_predictors_state_dict/data/5")
    with zipfile.ZipFile(MODEL_PT) as archive:
        real = archive.read("r18_w0125_init_state_dict/data.pkl")
    cut = real.index(b"_metadata")
    assert model_bytes[:cut] == real[:cut]


# Round trips through the test writer.


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8"])
def test_round_trip_dtypes(tmp_path, dtype):
    values = collections.OrderedDict(
        [("w", (np.arange(24) - 7).reshape(2, 3, 4).astype(dtype)), ("b", np.array([3, 1, 2], dtype)),
         ("scalar", np.array(5, dtype)), ("empty", np.zeros((0, 4), dtype))])
    _assert_same(read_state_dict(write_torch_zip(tmp_path / "a.pt", values)), values)


def test_round_trip_bool_and_zero_d(tmp_path):
    values = collections.OrderedDict(
        [("mask", np.array([[True, False], [False, True]])), ("num_batches_tracked", np.array(0, np.int64)),
         ("temperature", np.array(0.5, np.float32))])
    result = read_state_dict(write_torch_zip(tmp_path / "a.pt", values))
    _assert_same(result, values)
    assert result["num_batches_tracked"].shape == () and result["num_batches_tracked"] == 0


def test_round_trip_bfloat16_becomes_float32(tmp_path):
    values = np.array([[1.5, -2.0], [0.15625, 3.0e38]], np.float32)
    result = read_state_dict(write_torch_zip(tmp_path / "a.pt", {"w": BFloat16(values)}))
    assert result["w"].dtype == np.float32
    np.testing.assert_array_equal(result["w"], (values.view(np.uint32) & 0xFFFF0000).view(np.float32))
    np.testing.assert_array_equal(result["w"][:, 0], [1.5, 0.15625])  # exactly representable values survive


def test_strided_view_with_offset_and_shared_storage(tmp_path):
    storage = np.arange(30, dtype=np.float32)
    values = {
        "transposed": (storage, 2, (3, 4), (1, 5)),  # a transposed window starting at element 2
        "row": (storage, 25, (5,), (1,)),
        "every_other": (storage, 1, (2, 2, 2), (12, 6, 2)),
        "broadcast_ok": (storage, 0, (2, 3), (0, 1)),
    }
    pickle_bytes, storages = state_dict_pickle(values)
    assert list(storages) == ["0"]  # one storage shared by all four tensors
    result = read_state_dict(write_torch_zip(tmp_path / "a.pt", values))
    as_strided = np.lib.stride_tricks.as_strided
    for key, (_, offset, shape, strides) in values.items():
        expected = as_strided(storage[offset:], shape, [s * 4 for s in strides])
        np.testing.assert_array_equal(result[key], expected, err_msg=key)
        assert result[key].flags.c_contiguous and result[key].base is None
    result["row"][0] = -1  # copies: tensors sharing a storage do not alias each other
    assert result["transposed"][0, 0] == 2


def test_parameters_from_keep_vars(tmp_path):
    values = collections.OrderedDict([("w", np.arange(6, dtype=np.float32).reshape(2, 3)), ("b", np.ones(2, np.float32))])
    pickle_bytes, _ = state_dict_pickle(values, parameters=True)
    assert b"_rebuild_parameter" in pickle_bytes
    _assert_same(read_state_dict(write_torch_zip(tmp_path / "p.pt", values, parameters=True)), values)


def test_big_endian_byteorder(tmp_path):
    values = collections.OrderedDict(
        [("w", np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)), ("n", np.array(258, np.int64)),
         ("h", np.array([1.5, -0.25], np.float16)), ("d", np.array([np.pi], np.float64))])
    path = write_torch_zip(tmp_path / "a.pt", values, byteorder="big")
    with zipfile.ZipFile(path) as archive:
        assert archive.read("archive/data/1") == (258).to_bytes(8, "big")
    result = read_state_dict(path)
    _assert_same(result, values)
    assert all(value.dtype.isnative for value in result.values())


def test_archive_name_and_missing_byteorder(tmp_path):
    values = {"w": np.ones((2, 2), np.float32)}
    pickle_bytes, storages = state_dict_pickle(values)
    path = write_raw_torch_zip(tmp_path / "m.pt", pickle_bytes, storages, archive_name="m_init", byteorder=None)
    _assert_same(read_state_dict(path), values)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "model_state_dict"])
def test_wrapped_training_checkpoint(tmp_path, wrap):
    values = collections.OrderedDict([("a.weight", np.eye(3, dtype=np.float32)), ("a.bias", np.zeros(3, np.float32))])
    extras = {"epoch": 3, "best_acc": 0.875, "arch": "resnet18", "amp": False, "scaler": None, "step": 2**40}
    path = write_torch_zip(tmp_path / "c.pt", values, wrap=wrap, extras=extras)
    _assert_same(read_state_dict(path), values)


# Hostile files: nothing may run.


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize("kind, name", [("system", "system"), ("eval", "eval"), ("exec", "exec")])
def test_hostile_pickle_is_refused_without_running(tmp_path, no_unpickling, kind, name, protocol):
    marker = tmp_path / "pwned"
    payload = hostile_pickle(kind, marker, protocol=protocol)
    names = [arg for op, arg, _ in pickletools.genops(payload) if op.name in ("GLOBAL", "SHORT_BINUNICODE")]
    assert name.split(".")[-1] in " ".join(map(str, names))  # the payload really names the dangerous callable
    path = write_raw_torch_zip(tmp_path / "evil.pt", payload)
    # os.system pickles as posix.system; builtins as __builtin__ under protocol 2 (pickle's fix_imports).
    global_name = r"(posix|nt|os)\.system" if kind == "system" else rf"(builtins|__builtin__)\.{name}"
    with pytest.raises(TorchCheckpointError, match=rf"evil\.pt: .*global {global_name},.*only tensors, storages"):
        read_state_dict(path)
    assert not marker.exists()


def test_pickled_whole_module_is_refused(tmp_path):
    path = write_raw_torch_zip(tmp_path / "pred.pt", hostile_pickle("module", tmp_path / "unused"))
    with pytest.raises(TorchCheckpointError,
                       match=r"torch\.nn\.modules\.linear\.Linear.*not a state_dict: save model\.state_dict\(\)"):
        read_state_dict(path)


def test_unknown_global_in_state_dict_is_refused(tmp_path):
    pickle_bytes, storages = state_dict_pickle({"w": np.ones(2, np.float32)})
    pickle_bytes = pickle_bytes.replace(b"torch._utils\n_rebuild_tensor_v2\n", b"__main__\nFoo\n")
    path = write_raw_torch_zip(tmp_path / "a.pt", pickle_bytes, storages)
    with pytest.raises(TorchCheckpointError, match=r"global __main__\.Foo"):
        read_state_dict(path)


# Refusals of missing, foreign and corrupt files.


def test_missing_file(tmp_path):
    with pytest.raises(TorchCheckpointError, match=r"nope\.pt: file not found"):
        read_state_dict(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [pickle.dumps({"w": [1.0]}, protocol=2), b"not a checkpoint at all"])
def test_not_a_zip(tmp_path, content):
    path = tmp_path / "legacy.pt"
    path.write_bytes(content)
    with pytest.raises(TorchCheckpointError, match=r"legacy\.pt: not a torch\.save zip archive.*re-save"):
        read_state_dict(path)


def test_truncated_zip(tmp_path):
    data = MODEL_PT.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchCheckpointError, match=r"half\.pt: corrupt or truncated zip"):
        read_state_dict(path)


def test_corrupt_storage_bytes(tmp_path):
    data = bytearray(PREDICTORS_PT.read_bytes())
    with zipfile.ZipFile(PREDICTORS_PT) as archive:
        info = archive.getinfo("r18_w0125_predictors_state_dict/data/0")
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + 8] ^= 0xFF
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(TorchCheckpointError, match=r"corrupt zip archive: Bad CRC-32"):
        read_state_dict(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/weights.bin", b"\0" * 8)
    with pytest.raises(TorchCheckpointError, match=r"other\.zip: expected one <archive>/data\.pkl entry, found 0"):
        read_state_dict(path)


def test_missing_storage_entry(tmp_path):
    pickle_bytes, storages = state_dict_pickle({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)})
    del storages["1"]
    path = write_raw_torch_zip(tmp_path / "a.pt", pickle_bytes, storages)
    with pytest.raises(TorchCheckpointError, match=r"storage '1' is missing \(no entry archive/data/1\)"):
        read_state_dict(path)


def test_storage_size_mismatch(tmp_path):
    pickle_bytes, storages = state_dict_pickle({"a": np.ones(4, np.float32)})
    storages["0"] = storages["0"][:-4]
    path = write_raw_torch_zip(tmp_path / "a.pt", pickle_bytes, storages)
    with pytest.raises(TorchCheckpointError, match=r"storage '0' has 12 bytes, expected 16 \(4 FloatStorage"):
        read_state_dict(path)


def test_view_out_of_bounds(tmp_path):
    path = write_torch_zip(tmp_path / "a.pt", {"a": (np.arange(10, dtype=np.float32), 8, (3,), (1,))})
    with pytest.raises(TorchCheckpointError, match=r"out of bounds of storage '0' \(10 elements\)"):
        read_state_dict(path)


def test_expanded_view_larger_than_storage_is_refused(tmp_path):
    # A few bytes must not be able to demand a 4 TB copy through zero strides.
    path = write_torch_zip(tmp_path / "a.pt", {"a": (np.arange(1, dtype=np.float32), 0, (10**6, 10**6), (0, 0))})
    with pytest.raises(TorchCheckpointError, match=r"more elements than its storage '0' \(1\); expanded views"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "payload, opcode",
    [
        (pickle.dumps(bytearray(b"x"), protocol=5), "BYTEARRAY8"),
        (pickle.dumps(pickle.PickleBuffer(b"x"), protocol=5, buffer_callback=lambda buffer: False), "NEXT_BUFFER"),
        (b"(i__main__\nFoo\n.", "INST"),
        (b"\x80\x02(c__builtin__\nobject\no.", None),  # the global is refused before OBJ is reached
        (b"\x80\x02(o.", "OBJ"),
        (pickle.dumps({"w": b"raw" * 100}, protocol=3), "BINBYTES"),
        (b"\x80\x02I1\n.", "INT"),
    ],
)
def test_unsupported_opcode(tmp_path, payload, opcode):
    path = write_raw_torch_zip(tmp_path / "a.pt", payload)
    match = rf"unsupported pickle opcode {opcode}" if opcode else r"global __builtin__\.object"
    with pytest.raises(TorchCheckpointError, match=match):
        read_state_dict(path)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x80\x02}q\x00", r"ends without a STOP opcode"),
        (b"\x80\x02s.", r"SETITEM at byte 2: stack underflow"),
        (b"\x80\x02t.", r"TUPLE at byte 2: stack underflow \(no MARK\)"),
        (b"\x80\x02h\x05.", r"memo entry 5 was never stored"),
        (b"\x80\x02\xff.", r"corrupt near byte .*unknown"),
        (b"\x80\x02X\xff\x00\x00\x00ab", r"corrupt"),
        (b"\x80\x02]K\x01K\x02\x86s.", r"expected a dict"),
        (b"\x80\x02}K\x01\x85b.", r"expected a OrderedDict"),
        (b"\x80\x02K\x01Q.", r"persistent id is not \('storage'"),
        (b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R.", r"OrderedDict is only accepted with no arguments"),
        (b"\x80\x02ctorch\nFloatStorage\n)R.", r"cannot call a _StorageType"),
        (b"\x80\x02])R.", r"cannot call a list"),
    ],
)
def test_malformed_pickle(tmp_path, payload, match):
    path = write_raw_torch_zip(tmp_path / "a.pt", payload)
    with pytest.raises(TorchCheckpointError, match=match):
        read_state_dict(path)


def test_top_level_list(tmp_path):
    path = write_raw_torch_zip(tmp_path / "a.pt", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(TorchCheckpointError, match=r"data\.pkl holds a list, not a dict of tensors"):
        read_state_dict(path)


def test_dict_with_non_tensor_value(tmp_path):
    values = {"w": np.ones(2, np.float32)}
    path = write_torch_zip(tmp_path / "a.pt", values, wrap="weights", extras={"epoch": 3})
    with pytest.raises(TorchCheckpointError, match=r"the value of key 'weights' is a OrderedDict, not a tensor"):
        read_state_dict(path)
    path = write_torch_zip(tmp_path / "b.pt", {"w": np.ones(2, np.float32)}, wrap="state_dict",
                           extras={"epoch": 3})
    assert list(read_state_dict(path)) == ["w"]
    path = write_raw_torch_zip(tmp_path / "c.pt", pickle.dumps({"state_dict": {"w": [1.0]}}, protocol=2))
    with pytest.raises(TorchCheckpointError, match=r"in the 'state_dict' entry, the value of key 'w' is a list"):
        read_state_dict(path)
    path = write_raw_torch_zip(tmp_path / "d.pt", pickle.dumps({3: None}, protocol=2))
    with pytest.raises(TorchCheckpointError, match=r"key 3 is not a string"):
        read_state_dict(path)
