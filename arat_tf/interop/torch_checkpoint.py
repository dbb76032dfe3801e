"""Read ``torch.save`` state_dict checkpoints as numpy arrays, without PyTorch and without running pickle code.

A ``.pt`` file written by ``torch.save`` (the zip format, default since torch 1.6) is a zip archive holding a
pickle, ``<archive>/data.pkl``, plus one raw little- or big-endian byte blob per tensor storage,
``<archive>/data/<key>``. Unpickling executes whatever callables the pickle names, so ``pickle.load`` (and
``torch.load(..., weights_only=False)``) on a checkpoint downloaded from the internet can run arbitrary code.
This module never unpickles: it walks the opcodes with :func:`pickletools.genops` in a small stack machine that
knows only what a state_dict needs, maps the few allowed globals to its own stand-ins, and refuses anything else
before it is imported or called. The file is read as data.
"""

import collections
import math
import os
import pickletools
import zipfile
import zlib

import numpy as np

__all__ = ["TorchCheckpointError", "read_state_dict"]


class TorchCheckpointError(ValueError):
    """The file is not a readable ``torch.save`` state_dict; the message names the file and the problem."""


class _Bad(Exception):
    """A problem found while reading; :func:`read_state_dict` adds the file name."""


_NOT_ZIP = (
    "not a torch.save zip archive; the legacy pre-1.6 non-zip torch format and plain pickles are not "
    "supported: re-save with a recent torch `torch.save(state_dict, path)`"
)
_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "b1",
}
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PUSH_ARG = {
    "BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINSTRING", "SHORT_BINSTRING",
    "BININT", "BININT1", "BININT2", "LONG1", "LONG", "BINFLOAT",
}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


class _StorageType:
    """Stand-in for a ``torch.<X>Storage`` global: only its element type matters."""

    def __init__(self, name):
        self.name = name
        self.code = _STORAGE_DTYPES[name]
        self.itemsize = 2 if self.code == "bf16" else np.dtype(self.code).itemsize


_STORAGE_TYPES = {name: _StorageType(name) for name in _STORAGE_DTYPES}


class _Storage:
    def __init__(self, key, storage_type, array):
        self.key, self.storage_type, self.array = key, storage_type, array


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value):
    return isinstance(value, tuple) and all(_is_int(v) and v >= 0 for v in value)


def _ordered_dict(*args):
    if args:
        raise _Bad("collections.OrderedDict is only accepted with no arguments")
    return collections.OrderedDict()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """Copies the strided view of ``storage`` described by torch's tensor arguments into a new array.

    A tensor may not hold more elements than its storage: state_dicts in practice never do, and the rule stops a
    tiny file with zero strides from demanding a huge allocation.
    """
    if not isinstance(storage, _Storage):
        raise _Bad(f"_rebuild_tensor_v2 got a {type(storage).__name__} instead of a storage")
    if not (_is_int(storage_offset) and storage_offset >= 0 and _is_shape(size) and _is_shape(stride)
            and len(size) == len(stride)):
        raise _Bad(f"tensor on storage {storage.key!r} has a bad offset, size or stride "
                   f"({storage_offset!r}, {size!r}, {stride!r})")
    array = storage.array
    count = math.prod(size)
    if count == 0:
        return np.zeros(size, array.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= array.size:
        raise _Bad(f"tensor of size {size} with stride {stride} at offset {storage_offset} is out of bounds "
                   f"of storage {storage.key!r} ({array.size} elements)")
    if count > array.size:
        raise _Bad(f"tensor of size {size} has more elements than its storage {storage.key!r} "
                   f"({array.size}); expanded views are refused")
    view = np.lib.stride_tricks.as_strided(
        array[storage_offset:], shape=size, strides=[s * array.itemsize for s in stride], writeable=False)
    return np.array(view, copy=True, order="C")


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, np.ndarray):
        raise _Bad(f"_rebuild_parameter got a {type(data).__name__} instead of a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_CALLABLES = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}
_CALLABLE_SET = set(_CALLABLES.values())


def _resolve_global(module, name):
    if (module, name) in _CALLABLES:
        return _CALLABLES[module, name]
    if module == "torch" and name in _STORAGE_TYPES:
        return _STORAGE_TYPES[name]
    hint = ""
    if module == "torch.nn" or module.startswith("torch.nn."):
        hint = "; a pickled whole module (torch.save(model)) is not a state_dict: save model.state_dict() instead"
    raise _Bad(f"data.pkl names the global {module}.{name}, which is refused: only tensors, storages and "
               f"(ordered) dicts are accepted{hint} (nothing from the file was imported or run)")


def _run_pickle(data, load_storage):
    """Interprets the state_dict subset of pickle protocol 2 and returns the pickled object."""
    stack, metastack, memo = [], [], {}

    def pop():
        if not stack:
            raise _Bad("stack underflow")
        return stack.pop()

    def pop_mark():
        nonlocal stack
        if not metastack:
            raise _Bad("stack underflow (no MARK)")
        items, stack = stack, metastack.pop()
        return items

    def target(kind):
        if not stack or not isinstance(stack[-1], kind):
            raise _Bad(f"expected a {kind.__name__} on the stack")
        return stack[-1]

    name, pos = "PROTO", 0
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name in _PUSH_ARG:
                stack.append(arg)
            elif name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif name in ("PROTO", "FRAME"):
                pass
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "MARK":
                metastack.append(stack)
                stack = []
            elif name == "TUPLE":
                items = tuple(pop_mark())
                stack.append(items)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                stack.append(tuple(reversed([pop() for _ in range(int(name[-1]))])))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                if not stack:
                    raise _Bad("stack underflow")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                if arg not in memo:
                    raise _Bad(f"memo entry {arg} was never stored")
                stack.append(memo[arg])
            elif name == "SETITEM":
                value, key = pop(), pop()
                target(dict)[key] = value
            elif name == "SETITEMS":
                items = pop_mark()
                if len(items) % 2:
                    raise _Bad("odd number of items")
                target(dict).update(zip(items[::2], items[1::2]))
            elif name == "APPEND":
                value = pop()
                target(list).append(value)
            elif name == "APPENDS":
                items = pop_mark()
                target(list).extend(items)
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                module, qualname = arg.split(" ", 1) if name == "GLOBAL" else reversed([pop(), pop()])
                if not (isinstance(module, str) and isinstance(qualname, str)):
                    raise _Bad("STACK_GLOBAL needs two strings")
                stack.append(_resolve_global(module, qualname))
            elif name == "REDUCE":
                args, func = pop(), pop()
                if not (callable(func) and func in _CALLABLE_SET and isinstance(args, tuple)):
                    raise _Bad(f"cannot call a {type(func).__name__}")
                stack.append(func(*args))
            elif name == "BUILD":
                pop()  # torch attaches the state_dict's `_metadata` (module versions) as state: not wanted
                target(collections.OrderedDict)
            elif name == "BINPERSID":
                stack.append(load_storage(pop()))
            elif name == "STOP":
                return pop()
            else:
                raise _Bad(f"unsupported pickle opcode {name}")
    except _Bad as error:
        raise _Bad(f"data.pkl, opcode {name} at byte {pos}: {error}") from None
    except (TypeError, ValueError) as error:
        if "exhausted before seeing STOP" in str(error):
            raise _Bad("data.pkl ends without a STOP opcode (truncated pickle)") from None
        raise _Bad(f"data.pkl is corrupt near byte {pos} ({name}): {error}") from None
    raise _Bad("data.pkl ends without a STOP opcode")


def _storage_array(raw, storage_type, byteorder):
    order = "<" if byteorder == "little" else ">"
    if storage_type.code == "bf16":
        return (np.frombuffer(raw, order + "u2").astype(np.uint32) << 16).view(np.float32)
    if storage_type.code == "b1":
        return np.frombuffer(raw, np.uint8) != 0
    return np.frombuffer(raw, order + storage_type.code).astype(storage_type.code, copy=False)


def _tensor_dict_problem(mapping):
    for key, value in mapping.items():
        if not isinstance(key, str):
            return f"key {key!r} is not a string"
        if not isinstance(value, np.ndarray):
            return f"the value of key {key!r} is a {type(value).__name__}, not a tensor"
    return None


def _as_state_dict(obj):
    if not isinstance(obj, dict):
        raise _Bad(f"data.pkl holds a {type(obj).__name__}, not a dict of tensors")
    problem = _tensor_dict_problem(obj)
    if problem is None:
        return collections.OrderedDict(obj)
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            if _tensor_dict_problem(obj[key]) is None:
                return collections.OrderedDict(obj[key])
            problem = f"in the {key!r} entry, {_tensor_dict_problem(obj[key])}"
    raise _Bad(problem)


def _read(path):
    if not os.path.isfile(path):
        raise _Bad("file not found" if not os.path.exists(path) else "not a regular file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as file:
            head = file.read(2)
        raise _Bad("corrupt or truncated zip archive" if head == b"PK" else _NOT_ZIP) from None
    try:
        with archive:
            return _read_archive(archive)
    except (zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, NotImplementedError) as error:
        raise _Bad(f"corrupt zip archive: {error}") from None


def _read_archive(archive):
    names = archive.namelist()
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _Bad(f"expected one <archive>/data.pkl entry, found {len(pickles)}: not a torch.save archive")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise _Bad(f"byteorder entry is {byteorder!r}, expected 'little' or 'big'")
    storages = {}

    def load_storage(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Bad("persistent id is not ('storage', type, key, location, numel)")
        _, storage_type, key, location, numel = pid
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str)
                and isinstance(location, str) and _is_int(numel) and numel >= 0):
            raise _Bad("persistent id is not ('storage', type, key, location, numel)")
        if key in storages:
            cached = storages[key]
            if cached.storage_type is not storage_type or cached.array.size != numel:
                raise _Bad(f"storage {key!r} is used with two different types or sizes")
            return cached
        entry = f"{prefix}data/{key}"
        if entry not in names:
            raise _Bad(f"storage {key!r} is missing (no entry {entry})")
        size, expected = archive.getinfo(entry).file_size, numel * storage_type.itemsize
        if size != expected:
            raise _Bad(f"storage {key!r} has {size} bytes, expected {expected} "
                       f"({numel} {storage_type.name} elements)")
        storages[key] = _Storage(key, storage_type, _storage_array(archive.read(entry), storage_type, byteorder))
        return storages[key]

    return _as_state_dict(_run_pickle(archive.read(pickles[0]), load_storage))


def read_state_dict(path):
    """Reads a ``torch.save`` checkpoint of a state_dict into numpy arrays, without torch and without unpickling.

    The pickle is interpreted as data (see the module docstring), so a hostile file cannot run code: any global
    other than ``collections.OrderedDict``, torch's tensor/parameter rebuild functions and the
    ``torch.<X>Storage`` types is refused before anything is imported. Tensors keep torch's layout (e.g. conv
    weights OIHW), dtype and byte values; bfloat16 tensors become float32 (their 16 bits shifted into the high
    half of a float32, which is exact) because numpy has no bfloat16, and half tensors become float16. If the
    file holds a training checkpoint dict such as ``{"state_dict": {...}, "epoch": 3}``, the tensor dict under
    ``state_dict``, ``model_state_dict`` or ``model`` is returned.

    Args:
        path: The ``.pt`` / ``.pth`` file (str or path-like).

    Returns:
        An OrderedDict mapping each key, in the file's order, to a numpy array that owns its memory.

    Raises:
        TorchCheckpointError: The file is missing, not a torch.save zip archive, corrupt, names a refused
            global or opcode, or does not hold a dict of tensors. The message names the file and the problem.
    """
    path = os.fspath(path)
    try:
        return _read(path)
    except _Bad as error:
        raise TorchCheckpointError(f"{path}: {error}") from None
