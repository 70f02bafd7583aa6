"""learner.allocator: a learner rank's process runs on the malloc its config names, or fails saying why."""
from __future__ import annotations

import ctypes.util

import pytest

from learner.allocator import allocator_env, check_allocator, loaded_allocator

# .ci/run installs it (and fails if it cannot); elsewhere `make test` runs without it, saying so with -rs
needs_jemalloc = pytest.mark.skipif(ctypes.util.find_library("jemalloc") is None,
                                    reason="no libjemalloc.so.2 here: apt-get install libjemalloc2")


@needs_jemalloc
def test_jemalloc_is_preloaded_into_a_learner_actor_and_the_default_stays_glibc(ray_local):
    from actors.learner_actor import LearnerActor

    Learner = ray_local.remote(LearnerActor)
    chosen = {name: Learner.options(num_cpus=0, runtime_env={"env_vars": allocator_env(name)}).remote(0, 1)
              for name in ("jemalloc", "system")}
    try:
        assert {name: ray_local.get(a.allocator.remote()) for name, a in chosen.items()} == {
            "jemalloc": "jemalloc", "system": "system"}
    finally:
        for a in chosen.values():
            ray_local.kill(a)


def test_a_rank_without_the_allocator_it_was_asked_for_fails_naming_it_and_the_fix():
    assert loaded_allocator() == "system"  # pytest's own process: nothing preloaded
    check_allocator("system", "learner rank 0 on node 10.0.0.1")
    with pytest.raises(RuntimeError, match=r"learner rank 0 on node 10\.0\.0\.1 runs without libjemalloc.*"
                                           r"apt-get install libjemalloc2.*learner\.allocator=system"):
        check_allocator("jemalloc", "learner rank 0 on node 10.0.0.1")


def test_a_driver_node_without_jemalloc_refuses_the_setting_before_any_actor_starts(monkeypatch):
    import ctypes.util

    assert allocator_env("system") == {}
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)  # a node without the library
    with pytest.raises(RuntimeError, match="this node has no libjemalloc.so.2"):
        allocator_env("jemalloc")
