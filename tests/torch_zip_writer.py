"""Test-only writer of ``torch.save``-format zip files, without torch.

The pickle is assembled opcode by opcode (protocol 2) with the same structure, memo use and batching that
``torch.save(state_dict)`` produces through Python's pickler, so the reader under test sees what real files
hold. ``write_raw_torch_zip`` and ``hostile_pickle`` craft broken and malicious files.
"""

import collections
import os
import pickle
import struct
import zipfile

import numpy as np

_STORAGE_NAMES = {
    "float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage", "int64": "LongStorage",
    "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage",
    "bool": "BoolStorage",
}


class BFloat16:
    """A tensor value to write as a ``BFloat16Storage``: ``bits`` are the raw uint16 bfloat16 values."""

    def __init__(self, values):
        values = np.asarray(values, np.float32)
        self.shape = values.shape
        self.bits = (values.view(np.uint32) >> 16).astype(np.uint16)


class _Pickle:
    """Emits protocol-2 opcodes, memoizing like Python's pickler (globals and strings reused via BINGET)."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.memo = {}

    def put(self, memo_key=None):
        index = len(self.memo)
        self.memo[memo_key if memo_key is not None else ("object", index)] = index
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def get(self, memo_key):
        index = self.memo[memo_key]
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)

    def global_(self, module, name):
        if ("global", module, name) in self.memo:
            return self.get(("global", module, name))
        self.out += b"c" + f"{module}\n{name}\n".encode()
        self.put(("global", module, name))

    def str_(self, text):
        if ("str", text) in self.memo:
            return self.get(("str", text))
        data = text.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(data)) + data
        self.put(("str", text))

    def int_(self, value):
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data

    def scalar(self, value):
        if value is None or isinstance(value, bool):
            self.out += {None: b"N", True: b"\x88", False: b"\x89"}[value]
        elif isinstance(value, int):
            self.int_(value)
        elif isinstance(value, float):
            self.out += b"G" + struct.pack(">d", value)
        elif isinstance(value, str):
            self.str_(value)
        else:
            raise TypeError(f"cannot write {type(value).__name__}")

    def tuple_(self, items, emit=None):
        emit = emit or self.scalar
        if not items:
            self.out += b")"
            return
        if len(items) > 3:
            self.out += b"("
        for item in items:
            emit(item)
        self.out += b"t" if len(items) > 3 else b"\x85\x86\x87"[len(items) - 1 : len(items)]
        self.put()

    def ordered_dict(self):
        self.global_("collections", "OrderedDict")
        self.out += b")R"
        self.put()

    def items(self, pairs, emit_value):
        """SETITEM for one pair, MARK ... SETITEMS for batches of up to 1000, as pickle._batch_setitems."""
        pairs = list(pairs)
        for start in range(0, len(pairs), 1000):
            batch = pairs[start : start + 1000]
            if len(batch) > 1:
                self.out += b"("
            for key, value in batch:
                self.str_(key)
                emit_value(value)
            self.out += b"u" if len(batch) > 1 else b"s"


def _storage_and_view(value):
    if isinstance(value, tuple):
        storage, offset, shape, strides = value
        return storage, offset, tuple(shape), tuple(strides)
    shape = tuple(value.shape)
    strides, step = [], 1
    for n in reversed(shape):
        strides.insert(0, step)
        step *= n
    return value, 0, shape, tuple(strides)


def state_dict_pickle(state_dict, *, wrap=None, extras=None, metadata=(("", {"version": 1}),),
                      byteorder="little", parameters=False):
    """Returns ``(data.pkl bytes, {storage key: bytes})`` for ``state_dict`` as ``torch.save`` would write it.

    Values are numpy arrays, ``BFloat16`` values, or ``(storage_array, offset, shape, strides)`` views
    (element strides). Values that are the same storage object share one storage. ``metadata=None`` leaves
    out the ``_metadata`` BUILD (a plain OrderedDict, not from ``module.state_dict()``). ``wrap="state_dict"``
    writes ``{"state_dict": <it>, **extras}`` (a training-script checkpoint dict). ``parameters=True`` wraps
    each tensor in ``_rebuild_parameter`` as torch does for ``nn.Parameter`` (``state_dict(keep_vars=True)``).
    """
    pk, storage_info, storages = _Pickle(), {}, {}
    order = "<" if byteorder == "little" else ">"

    def emit_tensor(value):
        storage, offset, shape, strides = _storage_and_view(value)
        if id(storage) not in storage_info:
            key = str(len(storage_info))
            if isinstance(storage, BFloat16):
                storages[key] = storage.bits.astype(order + "u2").tobytes()
                storage_info[id(storage)] = (storage, key, "BFloat16Storage", storage.bits.size)
            else:
                flat = np.ascontiguousarray(storage).reshape(-1)
                storages[key] = flat.astype(flat.dtype.newbyteorder(order)).tobytes()
                storage_info[id(storage)] = (storage, key, _STORAGE_NAMES[flat.dtype.name], flat.size)
        _, key, type_name, numel = storage_info[id(storage)]
        if parameters:
            pk.global_("torch._utils", "_rebuild_parameter")
        pk.global_("torch._utils", "_rebuild_tensor_v2")
        pk.out += b"("
        pk.out += b"("
        pk.str_("storage")
        pk.global_("torch", type_name)
        pk.str_(key)
        pk.str_("cpu")
        pk.int_(numel)
        pk.out += b"t"
        pk.put()
        pk.out += b"Q"
        pk.int_(offset)
        pk.tuple_(shape)
        pk.tuple_(strides)
        pk.out += b"\x89"
        pk.ordered_dict()
        pk.out += b"t"
        pk.put()
        pk.out += b"R"
        pk.put()
        if parameters:
            pk.out += b"\x88"
            pk.ordered_dict()
            pk.out += b"\x87"
            pk.put()
            pk.out += b"R"
            pk.put()

    def emit_state_dict(mapping):
        pk.ordered_dict()
        pk.items(mapping.items(), emit_tensor)
        if metadata is not None:
            pk.out += b"}"
            pk.put()
            pk.str_("_metadata")
            pk.ordered_dict()
            pk.items(metadata.items() if isinstance(metadata, dict) else metadata, emit_plain_dict)
            pk.out += b"s"
            pk.out += b"b"

    def emit_plain_dict(mapping):
        pk.out += b"}"
        pk.put()
        pk.items(mapping.items(), pk.scalar)

    if wrap is None:
        emit_state_dict(state_dict)
    else:
        pk.out += b"}"
        pk.put()
        entries = [(wrap, state_dict)] + list((extras or {}).items())
        pk.items(entries, lambda v: emit_state_dict(v) if v is state_dict else pk.scalar(v))
    pk.out += b"."
    return bytes(pk.out), storages


def write_raw_torch_zip(path, pickle_bytes, storages=None, archive_name="archive", byteorder="little"):
    """Writes a zip with torch.save's entries around arbitrary ``data.pkl`` bytes (``byteorder=None``: no entry)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{archive_name}/data.pkl", pickle_bytes)
        archive.writestr(f"{archive_name}/.format_version", "1")
        archive.writestr(f"{archive_name}/.storage_alignment", "64")
        if byteorder is not None:
            archive.writestr(f"{archive_name}/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"{archive_name}/data/{key}", data)
        archive.writestr(f"{archive_name}/version", "3\n")
        archive.writestr(f"{archive_name}/.data/serialization_id", "0" * 20)
    return path


def write_torch_zip(path, state_dict, *, archive_name="archive", wrap=None, byteorder="little", **options):
    """Writes ``state_dict`` (see ``state_dict_pickle``) to ``path`` in the torch.save zip format."""
    pickle_bytes, storages = state_dict_pickle(state_dict, wrap=wrap, byteorder=byteorder, **options)
    return write_raw_torch_zip(path, pickle_bytes, storages, archive_name, byteorder)


class _Reduces:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_pickle(kind, marker, protocol=2):
    """Pickle bytes that would run code (or need foreign classes) under ``pickle.load``; never load them.

    ``kind``: "system" (os.system touching ``marker``), "eval" / "exec" (builtins creating ``marker``), or
    "module" (a whole pickled ``torch.nn.modules.linear.Linear``, as ``torch.save(model)`` writes).
    """
    marker = os.fspath(marker)
    if kind == "system":
        return pickle.dumps(_Reduces(os.system, ("touch " + marker,)), protocol=protocol)
    if kind == "eval":
        return pickle.dumps(_Reduces(eval, (f"open({marker!r}, 'w').close()",)), protocol=protocol)
    if kind == "exec":
        return pickle.dumps(_Reduces(exec, (f"open({marker!r}, 'w').close()",)), protocol=protocol)
    if kind == "module":
        pk = _Pickle()
        pk.global_("torch.nn.modules.linear", "Linear")
        pk.out += b")\x81"  # EMPTY_TUPLE NEWOBJ
        pk.put()
        pk.out += b"}"
        pk.put()
        pk.items([("training", True), ("_parameters", collections.OrderedDict())],
                 lambda v: pk.ordered_dict() if isinstance(v, dict) else pk.scalar(v))
        pk.out += b"b."
        return bytes(pk.out)
    raise ValueError(kind)
