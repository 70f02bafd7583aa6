"""stream.codec: exact msgpack round trips of rollout groups, and clear errors for anything else."""
from __future__ import annotations

import pickle
import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.rollout import Completion, PromptInputs, RolloutGroup, RolloutRequest
from stream.codec import FORMAT_VERSION, CodecError, decode_group, encode_group


def make_group(prompt_len=40, size=(56, 84), g=4, tokens=12, seed=0, solution="golden retriever", meta=None,
               text="<answer>golden retriever</answer>") -> RolloutGroup:
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    inputs = PromptInputs(input_ids=torch.randint(0, 151_000, (prompt_len,), generator=gen),
                          image=torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8),
                          image_grid_thw=torch.tensor([[1, max(1, h // 14), max(1, w // 14)]]))
    comps = [Completion(token_ids=torch.randint(0, 151_000, (tokens,), generator=gen).tolist(),
                        logprobs=(-torch.rand(tokens, generator=gen) * 5).tolist(), text=text,
                        finish_reason="stop" if i % 2 else "length") for i in range(g)]
    return RolloutGroup(request=RolloutRequest(prompt_id=f"shapes/train/{seed}", inputs=inputs, solution=solution,
                                               meta=meta if meta is not None else {"dataset": "shapes", "epoch": 2}),
                        completions=comps, policy_version=7, rewards=[1.0, 0.0, 0.5, 1.0][:g],
                        reward_components={"format": [1.0] * g, "cls_equality": [0.0] * g})


def same(a, b) -> bool:
    """Equality that tells -0.0 from 0.0, compares NaN bits, and requires matching types."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def tensor_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.contiguous().reshape(-1).view(torch.uint8).tolist() == b.contiguous().reshape(-1).view(torch.uint8).tolist())


def assert_same_group(a: RolloutGroup, b: RolloutGroup) -> None:
    for f in ("input_ids", "image", "image_grid_thw"):
        assert tensor_identical(getattr(a.request.inputs, f), getattr(b.request.inputs, f)), f
    assert a.request.prompt_id == b.request.prompt_id
    assert same(a.request.solution, b.request.solution)
    assert same(a.request.meta, b.request.meta)
    assert a.policy_version == b.policy_version
    assert same(a.rewards, b.rewards) and same(a.reward_components, b.reward_components)
    assert len(a.completions) == len(b.completions)
    for x, y in zip(a.completions, b.completions):
        assert x.token_ids == y.token_ids and same(x.logprobs, y.logprobs)
        assert x.text == y.text and x.finish_reason == y.finish_reason and x.versions == y.versions


def test_round_trip_typical_group():
    g = make_group()
    out = decode_group(encode_group(g))
    assert_same_group(g, out)
    assert out.request.inputs.input_ids.dtype == torch.int64
    assert out.request.inputs.image_grid_thw.dtype == torch.int64
    out.request.inputs.image.add_(1)  # decoded tensors own writable memory


def test_text_only_prompt_round_trips_without_image_fields():
    g = make_group()
    g.request.inputs.image = g.request.inputs.image_grid_thw = None
    out = decode_group(encode_group(g))
    assert out.request.inputs.image is None and out.request.inputs.image_grid_thw is None
    assert torch.equal(out.request.inputs.input_ids, g.request.inputs.input_ids)
    doc = msgpack.unpackb(encode_group(make_group()), raw=False)
    del doc["request"]["inputs"]["input_ids"]  # the token ids are never optional
    with pytest.raises(CodecError, match="missing field 'input_ids'"):
        decode_group(msgpack.packb(doc, use_bin_type=True))


def test_image_travels_as_its_uint8_pixels_and_anything_else_is_refused():
    g = make_group()
    g.request.inputs.image[0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    doc = msgpack.unpackb(encode_group(g))
    assert doc["request"]["inputs"]["image"]["dtype"] == "uint8" and "pixel_values" not in doc["request"]["inputs"]
    assert len(doc["request"]["inputs"]["image"]["data"]) == 56 * 84 * 3
    assert tensor_identical(g.request.inputs.image, decode_group(encode_group(g)).request.inputs.image)
    for bad in (g.request.inputs.image.float(), g.request.inputs.image[..., :2], g.request.inputs.image[0]):
        g.request.inputs.image = bad  # float patches, two channels, one row: not an image the learner can use
        with pytest.raises(CodecError, match=r"request.inputs.image: expected a uint8 \[H, W, 3\] image"):
            decode_group(encode_group(g))


def test_odd_tensors():
    g = make_group()
    g.request.inputs.image = torch.randint(0, 256, (3, 8, 6), dtype=torch.uint8).permute(1, 2, 0)  # non-contiguous
    g.request.inputs.input_ids = torch.empty(0, dtype=torch.long)
    g.request.inputs.image_grid_thw = torch.tensor(3)  # 0-dim
    out = decode_group(encode_group(g))
    assert_same_group(g, out)


def test_logprobs_exact_and_compact():
    g = make_group(g=2, tokens=100)
    g.completions[1].logprobs = [0.1] * 99 + [float("-inf")]  # 0.1 is not a float32: must stay float64
    out = decode_group(encode_group(g))
    assert_same_group(g, out)
    doc = msgpack.unpackb(encode_group(g))
    assert [c["logprobs_dtype"] for c in doc["completions"]] == ["f4", "f8"]
    assert len(doc["completions"][0]["logprobs"]) == 400
    g.completions[0].logprobs = [float("nan"), -0.0, 0.0, 5e-324]
    assert same(decode_group(encode_group(g)).completions[0].logprobs, g.completions[0].logprobs)


def test_token_versions_travel_as_runs():
    g = make_group(g=3, tokens=6)
    g.completions[0].versions = [4, 4, 4, 5, 5, 7]  # partial rollout: continued under versions 5 and 7
    g.completions[1].versions = [4] * 6
    doc = msgpack.unpackb(encode_group(g))
    assert [c.get("versions") for c in doc["completions"]] == [[[0, 4], [3, 5], [5, 7]], [[0, 4]], None]
    out = decode_group(encode_group(g))
    assert_same_group(g, out)
    assert out.completions[2].versions == [] and out.version_span == (4, 7)
    g.completions[0].versions = [4, 5]
    with pytest.raises(CodecError, match=r"completions\[0\].versions has 2 entries for 6 tokens"):
        encode_group(g)
    for runs in ([[1, 4]], [[0, 4], [0, 5]], [[0, 4], [6, 5]], [[0, "4"]]):
        doc["completions"][0]["versions"] = runs
        with pytest.raises(CodecError, match=r"completions\[0\].versions"):
            decode_group(msgpack.packb(doc))


def test_text_with_nul_and_lone_surrogates():
    g = make_group(text="a\x00b\ud800c \U0001f600 مرحبا \u200b")
    assert decode_group(encode_group(g)).completions[0].text == g.completions[0].text


def test_tuples_come_back_as_lists():
    g = make_group(solution=[(1, 2.5, 3, 4)], meta={"box": (1, 2)})
    out = decode_group(encode_group(g))
    assert same(out.request.solution, [[1, 2.5, 3, 4]]) and same(out.request.meta, {"box": [1, 2]})


json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text()
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids,
                                                                                                    max_size=4),
                           max_leaves=20)
boxes = st.lists(st.lists(st.floats() | st.integers(-10_000, 10_000), min_size=4, max_size=4), max_size=5)


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(exclude_categories=())), solution=st.none() | st.text() | boxes | json_values,
       meta=st.dictionaries(st.text(), json_values, max_size=5), finish=st.text(max_size=8),
       rewards=st.none() | st.lists(st.floats(), max_size=4), version=st.integers(-(2**63), 2**63 - 1))
def test_round_trip_property(text, solution, meta, finish, rewards, version):
    g = make_group(size=(2, 3), g=2, tokens=3, solution=solution, meta=meta, text=text)
    g.completions[0].finish_reason = finish
    g.rewards, g.policy_version = rewards, version
    assert_same_group(g, decode_group(encode_group(g)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_codec_error(data):
    with pytest.raises(CodecError):
        decode_group(data)


def test_bad_payloads_are_named():
    good = encode_group(make_group(size=(4, 4)))
    with pytest.raises(CodecError, match="msgpack"):
        decode_group(good[:-10])  # truncated
    with pytest.raises(CodecError, match="msgpack"):
        decode_group(good + b"\x00")  # trailing data
    with pytest.raises(CodecError, match="not a clsrl.RolloutGroup"):
        decode_group(msgpack.packb({"hello": 1}))
    doc = msgpack.unpackb(good)
    doc["version"] = FORMAT_VERSION + 1
    with pytest.raises(CodecError, match=f"version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        decode_group(msgpack.packb(doc))
    doc = msgpack.unpackb(good)
    doc["request"]["inputs"]["image"]["dtype"] = "object"
    with pytest.raises(CodecError, match="image: unknown dtype 'object'"):
        decode_group(msgpack.packb(doc))
    doc = msgpack.unpackb(good)
    doc["request"]["inputs"]["image"]["shape"] = [5, 4, 3]
    with pytest.raises(CodecError, match=r"image: 48 bytes for a uint8 tensor of shape \[5, 4, 3\]"):
        decode_group(msgpack.packb(doc))
    doc = msgpack.unpackb(good)
    doc["request"]["meta"] = {"x": msgpack.ExtType(5, b"boo")}
    with pytest.raises(CodecError, match=r"request.meta\['x'\]: unsupported type"):
        decode_group(msgpack.packb(doc))
    doc = msgpack.unpackb(good)
    del doc["completions"][0]["text"]
    with pytest.raises(CodecError, match=r"completions\[0\]: missing field 'text'"):
        decode_group(msgpack.packb(doc))


class _Boom:
    ran = False

    def __reduce__(self):
        return (setattr, (_Boom, "ran", True))


def test_pickle_payload_is_not_executed():
    with pytest.raises(CodecError):
        decode_group(pickle.dumps({"g": _Boom()}))
    assert not _Boom.ran


def test_unencodable_values_name_the_path():
    with pytest.raises(CodecError, match=r"request.meta\['tags'\]: unsupported type builtins.set"):
        encode_group(make_group(meta={"tags": {1, 2}}))
    with pytest.raises(CodecError, match=r"request.meta: keys must be str, got 3"):
        encode_group(make_group(meta={3: "x"}))
    with pytest.raises(CodecError, match=r"request.solution\[0\]: integer .* 64 bits"):
        encode_group(make_group(solution=[2**70]))
    with pytest.raises(CodecError, match="nested deeper"):
        deep: list = []
        for _ in range(100):
            deep = [deep]
        encode_group(make_group(solution=deep))
    g = make_group()
    g.request.inputs.image = g.request.inputs.image.to(torch.complex64)
    with pytest.raises(CodecError, match="request.inputs.image: unsupported tensor torch.complex64"):
        encode_group(g)


def test_typical_group_size_is_its_tensors_plus_little():
    # Qwen2-VL at 448x448: the 8-bit image (the learner rebuilds its 1024 patches); G=8 completions of 256 tokens.
    g = make_group(prompt_len=300, size=(448, 448), g=8, tokens=256)
    raw = sum(t.numel() * t.element_size() for t in vars(g.request.inputs).values())
    per_token = 5 + 4  # msgpack int up to 2**32, float32 log-prob
    n = len(encode_group(g))
    assert raw < n < raw + 8 * 256 * per_token + 4096, (n, raw)
    assert n * 7 < 1024 * 1176 * 4  # the float32 patches it replaces: 4.8 MB, over 7x the whole group


def test_token_ids_that_are_not_ids_are_named():
    g = make_group()
    g.completions[1].token_ids = [1, 2.5, 3]
    with pytest.raises(CodecError, match=r"completions\[1\].token_ids must be a flat list of ints"):
        encode_group(g)
    g.completions[1].token_ids = [1, -4, 3]
    with pytest.raises(CodecError, match=r"completions\[1\].token_ids: ids must be in \[0, 2\*\*31\)"):
        encode_group(g)
    doc = msgpack.unpackb(encode_group(make_group()), raw=False)
    doc["completions"][0]["token_ids"] = b"\x01\x02\x03"
    with pytest.raises(CodecError, match=r"completions\[0\].token_ids: 3 bytes is not a whole number"):
        decode_group(msgpack.packb(doc, use_bin_type=True))
