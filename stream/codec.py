"""RolloutGroup <-> bytes for the Redis buffer: msgpack with tensors as raw bytes, never pickle.

Pickle (and torch.save/torch.load) would let whoever can write to the stream run code in the learner, so the
format is plain msgpack maps of str/int/float/bytes/lists. Tensors travel as {dtype name, shape, little-endian
bytes}; decoding allocates them from an allow-list of dtypes and checks the byte count, so a wrong or hostile
payload is a `CodecError`, never something executed. A prompt's image travels as its resized 8-bit pixels
(lossless; the learner rebuilds the float patches from them, vlm/inputs.py `image_patches`). Every round
trip is exact: tensors bit for bit (bfloat16 included), floats as float64 (log-probs as float32 bytes when
that is lossless, else float64), text as any Python str (lone surrogates and NUL included). Tuples in
`solution`/`meta` come back as lists.
A completion's per-token policy versions travel run-length encoded as [[first token, version], ...] under the
optional key "versions" (absent = empty), which readers of the same format version without it ignore.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import msgpack
import numpy as np
import torch

from protocol.rollout import Completion, PromptInputs, RolloutGroup, RolloutRequest

FORMAT = "clsrl.RolloutGroup"
# bump on any incompatible change; decoders refuse other versions by name (2: token ids as int32 bytes;
# 3: the prompt's resized image as uint8 [H, W, 3] instead of its float32 patches, ~7x fewer bytes)
FORMAT_VERSION = 3
MAX_NESTING = 64  # solution/meta deeper than this is a bug upstream, and bounds our recursion

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                 "bool")
}
_TENSOR_FIELDS = ("input_ids", "image", "image_grid_thw")
_OPTIONAL_TENSORS = ("image", "image_grid_thw")  # absent for a text-only prompt

if sys.byteorder != "little":  # raw tensor bytes are written in native order; every supported host is LE
    raise ImportError("stream.codec supports little-endian hosts only")


class CodecError(ValueError):
    """Bytes that are not a rollout group this build can read, or a group that cannot be encoded."""


# ----------------------------------------------------------------------------------------------- encode


def _pack_tensor(t: Any, where: str) -> dict:
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES or t.layout != torch.strided:
        raise CodecError(f"{where}: unsupported tensor {t.dtype} ({t.layout}); "
                         f"supported dtypes: {', '.join(_DTYPES)}")
    flat = t.detach().cpu().contiguous().reshape(-1)
    # a memoryview: msgpack copies the bytes once into its output (tobytes() would copy them twice)
    return {"dtype": name, "shape": list(t.shape), "data": memoryview(flat.view(torch.uint8).numpy())}


def _check_plain(value: Any, where: str, depth: int = 0) -> Any:
    """JSON-like values (plus bytes) as msgpack stores them; anything else is named, not silently str()-ed."""
    if depth > MAX_NESTING:
        raise CodecError(f"{where} is nested deeper than {MAX_NESTING} levels")
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise CodecError(f"{where}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, (list, tuple)) and not isinstance(value, msgpack.ExtType):  # ExtType is a namedtuple
        return [_check_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise CodecError(f"{where}: keys must be str, got {k!r} ({type(k).__name__})")
        return {k: _check_plain(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
    raise CodecError(f"{where}: unsupported type {type(value).__module__}.{type(value).__qualname__} "
                     f"(use None, bool, int, float, str, bytes, list or dict)")


def _pack_logprobs(values: Any, where: str) -> tuple[bytes, str]:
    try:
        f64 = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise CodecError(f"{where} must be a list of floats: {err}") from None
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = f64.astype(np.float32)
    # float32 halves the bytes and is what samplers produce; fall back to float64 whenever it would round.
    if np.array_equal(f32.astype(np.float64), f64):
        return f32.astype("<f4").tobytes(), "f4"
    return f64.astype("<f8").tobytes(), "f8"


def _pack_ids(values: Any, where: str) -> bytes:
    """Token ids as little-endian int32 bytes: a msgpack list of ints costs ~10x more to pack, check, read."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise CodecError(f"{where}.token_ids must be a flat list of ints")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**31):
        raise CodecError(f"{where}.token_ids: ids must be in [0, 2**31), "
                         f"got {int(arr.min())}..{int(arr.max())}")
    return arr.astype("<i4").tobytes()


def _pack_versions(versions: Any, n_tokens: int, where: str) -> list[list[int]]:
    """Per-token versions as runs [[first token, version], ...]; a partial rollout has a handful at most."""
    if not isinstance(versions, (list, tuple)) or not all(type(v) is int for v in versions):
        raise CodecError(f"{where}.versions must be a list of ints")
    if versions and len(versions) != n_tokens:
        raise CodecError(f"{where}.versions has {len(versions)} entries for {n_tokens} tokens")
    runs: list[list[int]] = []
    for i, v in enumerate(versions):
        if not runs or runs[-1][1] != v:
            runs.append([i, _check_plain(v, f"{where}.versions[{i}]")])
    return runs


def _unpack_versions(runs: Any, n_tokens: int, where: str) -> list[int]:
    def is_run(r: Any) -> bool:
        return isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)

    if not isinstance(runs, list) or not all(is_run(r) for r in runs):
        raise CodecError(f"{where}.versions: expected [[first token, version], ...], got {runs!r:.200}")
    starts = [r[0] for r in runs] + [n_tokens]
    if runs and (starts[0] != 0 or any(a >= b for a, b in zip(starts, starts[1:]))):
        raise CodecError(f"{where}.versions: run starts {starts[:-1]} do not cover {n_tokens} tokens "
                         f"in order")
    return [v for (start, v), end in zip(runs, starts[1:]) for _ in range(end - start)]


def _pack_completion(c: Any, i: int) -> dict:
    where = f"completions[{i}]"
    if not isinstance(c, Completion):
        raise CodecError(f"{where} must be a Completion, got {type(c).__name__}")
    ids = _pack_ids(c.token_ids, where)
    lp, lp_dtype = _pack_logprobs(c.logprobs, f"{where}.logprobs")
    for name in ("text", "finish_reason"):
        if not isinstance(getattr(c, name), str):
            raise CodecError(f"{where}.{name} must be str, got {type(getattr(c, name)).__name__}")
    doc = {"token_ids": ids, "logprobs": lp, "logprobs_dtype": lp_dtype, "text": c.text,
           "finish_reason": c.finish_reason}
    versions = _pack_versions(c.versions, len(ids) // 4, where)
    if versions:
        doc["versions"] = versions
    return doc


def encode_group(group: RolloutGroup) -> bytes:
    if not isinstance(group, RolloutGroup):
        raise CodecError(f"expected a RolloutGroup, got {type(group).__name__}")
    req = group.request
    if not isinstance(req.prompt_id, str):
        raise CodecError(f"request.prompt_id must be str, got {type(req.prompt_id).__name__}")
    if not isinstance(req.meta, dict):
        raise CodecError(f"request.meta must be a dict, got {type(req.meta).__name__}")
    if isinstance(group.policy_version, bool) or not isinstance(group.policy_version, int):
        raise CodecError(f"policy_version must be int, got {group.policy_version!r}")
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "request": {
            "prompt_id": req.prompt_id,
            "inputs": {f: _pack_tensor(getattr(req.inputs, f), f"request.inputs.{f}") for f in _TENSOR_FIELDS
                       if getattr(req.inputs, f) is not None or f not in _OPTIONAL_TENSORS},
            "solution": _check_plain(req.solution, "request.solution"),
            "meta": _check_plain(req.meta, "request.meta"),
        },
        "completions": [_pack_completion(c, i) for i, c in enumerate(group.completions)],
        "policy_version": _check_plain(group.policy_version, "policy_version"),
        "rewards": _check_plain(group.rewards, "rewards"),
        "reward_components": _check_plain(group.reward_components, "reward_components"),
    }
    return msgpack.packb(doc, use_bin_type=True, unicode_errors="surrogatepass")


# ----------------------------------------------------------------------------------------------- decode


def _get(d: dict, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise CodecError(f"{where}: missing field '{key}'")
    value = d[key]
    if not isinstance(value, types) or (types is int and isinstance(value, bool)):
        raise CodecError(f"{where}.{key}: expected {getattr(types, '__name__', types)}, "
                         f"got {type(value).__name__}")
    return value


def _unpack_tensor(d: Any, where: str) -> torch.Tensor:
    if not isinstance(d, dict):
        raise CodecError(f"{where}: expected a tensor map, got {type(d).__name__}")
    name = _get(d, "dtype", str, where)
    if name not in _DTYPES:
        raise CodecError(f"{where}: unknown dtype {name!r}")
    shape = _get(d, "shape", list, where)
    if not all(type(s) is int and s >= 0 for s in shape):
        raise CodecError(f"{where}: bad shape {shape!r}")
    data = _get(d, "data", bytes, where)
    dtype = _DTYPES[name]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise CodecError(f"{where}: {len(data)} bytes for a {name} tensor of shape {shape} "
                         f"({expected} expected)")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype is torch.bool and max(data) > 1:  # other byte values are not valid bools
        raise CodecError(f"{where}: bool tensor holds bytes other than 0/1")
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)  # bytearray: writable, owned


def _unpack_completion(d: Any, where: str) -> Completion:
    if not isinstance(d, dict):
        raise CodecError(f"{where}: expected a map, got {type(d).__name__}")
    raw_ids = _get(d, "token_ids", bytes, where)
    if len(raw_ids) % 4:
        raise CodecError(f"{where}.token_ids: {len(raw_ids)} bytes is not a whole number of int32 ids")
    arr = np.frombuffer(raw_ids, dtype="<i4")
    if arr.size and int(arr.min()) < 0:
        raise CodecError(f"{where}.token_ids: negative id {int(arr.min())}")
    ids = arr.tolist()
    raw = _get(d, "logprobs", bytes, where)
    lp_dtype = _get(d, "logprobs_dtype", str, where)
    if lp_dtype not in ("f4", "f8") or len(raw) % int(lp_dtype[1]):
        raise CodecError(f"{where}: bad logprobs ({lp_dtype!r}, {len(raw)} bytes)")
    logprobs = np.frombuffer(raw, dtype="<" + lp_dtype).astype(np.float64).tolist()
    return Completion(token_ids=ids, logprobs=logprobs, text=_get(d, "text", str, where),
                      finish_reason=_get(d, "finish_reason", str, where),
                      versions=_unpack_versions(d.get("versions", []), len(ids), where))


def decode_group(data: bytes) -> RolloutGroup:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True, unicode_errors="surrogatepass")
    except Exception as err:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise CodecError(f"not a msgpack rollout group ({len(data)} bytes): "
                         f"{type(err).__name__}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CodecError(f"not a {FORMAT} payload ({len(data)} bytes, decoded to {type(doc).__name__})")
    if doc.get("version") != FORMAT_VERSION:
        raise CodecError(f"{FORMAT} format version {doc.get('version')!r}; this build reads version "
                         f"{FORMAT_VERSION} (do producer and learner run the same clsrl?)")
    req = _get(doc, "request", dict, "group")
    inputs = _get(req, "inputs", dict, "request")
    tensors = {f: _unpack_tensor(_get(inputs, f, dict, "request.inputs"), f"request.inputs.{f}")
               for f in _TENSOR_FIELDS if f in inputs or f not in _OPTIONAL_TENSORS}
    image = tensors.get("image")
    if image is not None and (image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3):
        raise CodecError(f"request.inputs.image: expected a uint8 [H, W, 3] image, got {image.dtype} "
                         f"{list(image.shape)}")
    completions = _get(doc, "completions", list, "group")
    rewards = doc.get("rewards")
    if rewards is not None and not isinstance(rewards, list):
        raise CodecError(f"group.rewards: expected list or None, got {type(rewards).__name__}")
    request = RolloutRequest(
        prompt_id=_get(req, "prompt_id", str, "request"),
        inputs=PromptInputs(**tensors),
        solution=_check_plain(req.get("solution"), "request.solution"),  # also rejects msgpack ext types
        meta=_check_plain(_get(req, "meta", dict, "request"), "request.meta"))
    return RolloutGroup(
        request=request,
        completions=[_unpack_completion(c, f"completions[{i}]") for i, c in enumerate(completions)],
        policy_version=_get(doc, "policy_version", int, "group"),
        rewards=_check_plain(rewards, "rewards"),
        reward_components=_check_plain(_get(doc, "reward_components", dict, "group"), "reward_components"))
