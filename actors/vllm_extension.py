"""Mixed into every vLLM worker (`worker_extension_cls`) and reached through `LLM.collective_rpc`: the
worker's end of the weight sync. Each worker (one per tensor-parallel rank) joins the learners' weight group
as its own rank, receives whole versions and loads them through the model's `load_weights`; colocated, it
rebuilds the learner's tensors from CUDA IPC handles instead. Method names carry a `clsrl_` prefix so they
cannot clash with vLLM's own worker attributes.
"""
from __future__ import annotations

from actors import vllm_adapter as adapter


class WeightSyncExtension:
    _clsrl_receiver = None

    def clsrl_join_weight_group(self, host: str, port: int, first_rank: int, num_ranks: int, cfg: dict,
                                name: str) -> str:
        from protocol.components import WeightSyncConfig
        from weights.receiver import WeightReceiver

        self.clsrl_leave_weight_group()
        tp_rank = adapter.worker_rank(self)
        self._clsrl_receiver = WeightReceiver(host, port, first_rank + tp_rank, num_ranks,
                                              WeightSyncConfig(**cfg), name=f"{name} tp{tp_rank}")
        return self._clsrl_receiver.name

    def clsrl_receive_weights(self) -> tuple[int, int]:
        """Block until a whole version has arrived, then load it; (version, tensors)."""
        if self._clsrl_receiver is None:
            raise RuntimeError("receive_weights before join_weight_group")
        version, named = self._clsrl_receiver.receive()
        adapter.load_weights(self, named)
        return version, len(named)

    def clsrl_load_ipc(self, handles: list[tuple[str, tuple]]) -> int:
        """Colocated: map the learner's tensors from their handles (weights/ipc.py) and load them; the
        learner keeps them alive until this returns."""
        from weights.ipc import rebuild

        named = rebuild(handles, adapter.worker_device(self))
        adapter.load_weights(self, named)
        return len(named)

    def clsrl_checksums(self) -> dict[str, str]:
        """A SHA-256 per parameter (weights/checksum.py), under vLLM's own (fused) names. On vLLM's CPU build
        linear layers compute from a prepacked copy, so their `weight` parameters do not follow reloads."""
        from weights.checksum import checksums

        return checksums(adapter.worker_model(self).named_parameters())

    def clsrl_leave_weight_group(self) -> None:
        if self._clsrl_receiver is not None:
            self._clsrl_receiver.close()
            self._clsrl_receiver = None
