"""weights/checksum.py: "the same weights" means the same bytes, dtype and shape per parameter, which a float
sum (the check it replaced) cannot tell from a permutation or a transpose."""
from __future__ import annotations

import torch

from actors.hf_engine import HFEngine
from weights.checksum import checksums, digest, tensor_digest


def _float_sum(t: torch.Tensor) -> float:
    return float(t.double().sum())


def test_equal_sums_different_bytes_hash_differently():
    w = torch.arange(16, dtype=torch.float32).reshape(4, 4)  # integers: every sum below is exact
    for other in (w.t(), w.flip(0), w[torch.tensor([1, 0, 2, 3])]):
        assert _float_sum(other) == _float_sum(w)  # the old check would have called these equal
        assert tensor_digest("w", other) != tensor_digest("w", w)
    assert checksums([("a", w), ("b", w.t())]) != checksums([("a", w.t()), ("b", w)])


def test_dtype_shape_and_name_count_and_layout_does_not():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)
    same_bytes = [w.view(torch.int32), w.reshape(4, 6), w.reshape(-1)]  # identical bytes, other dtype/shape
    assert len({tensor_digest("w", t) for t in [w, *same_bytes]}) == 4
    assert tensor_digest("w", w) != tensor_digest("v", w)
    strided = torch.randn(4, 6, generator=g).t()  # non-contiguous: hashed as its row-major values
    assert tensor_digest("w", strided) == tensor_digest("w", strided.contiguous())
    assert tensor_digest("w", w.bfloat16()) != tensor_digest("w", w)  # bf16 hashes (no numpy dtype) and differs
    assert tensor_digest("w", w.clone()) == tensor_digest("w", w)
    nudged = w.clone()
    nudged[0, 0] = torch.nextafter(nudged[0, 0], torch.tensor(float("inf")))  # one ulp
    assert tensor_digest("w", nudged) != tensor_digest("w", w)
    named = [("a", w), ("b", strided)]
    assert digest(named) == digest(named[::-1]) != digest([("a", w), ("b", strided.t())])


def test_hf_engine_reports_the_shared_checksums_and_sees_a_transposed_weight(tiny_model_dir):
    """What the loop compares (learner rank 0 vs each engine): the engine after an update hashes exactly like
    the tensors it was sent; a transposed square weight is caught although every float sum still agrees."""
    engine = HFEngine(tiny_model_dir)
    sent = [(n, p.detach() + 0.01) for n, p in engine.model.named_parameters()]
    engine.update_weights(sent, version=1)
    assert engine.checksums() == checksums(sent)

    name, square = next((n, t) for n, t in sent if t.dim() == 2 and t.shape[0] == t.shape[1]
                        and not torch.equal(t, t.t()))
    wrong = [(n, t.t() if n == name else t) for n, t in sent]
    engine.update_weights(wrong, version=2)
    sums = {n: _float_sum(p) for n, p in engine.model.named_parameters()}
    assert sums == {n: _float_sum(t) for n, t in sent}  # a float-sum comparison passes
    got = engine.checksums()
    assert got != checksums(sent) and [n for n in got if got[n] != checksums(sent)[n]] == [name]
