"""Rollout tokens/s on CPU: vLLM's CPU build against the HF engine, same prompts, same model, same settings.

    .venv-vllm/bin/python bench/vllm_vs_hf.py                 # ~3 min on 2 cores
    .venv-vllm/bin/python bench/vllm_vs_hf.py --prompts 2 --repeats 1

Run in the vLLM environment (`make test-vllm` builds it). Both engines load the tiny Qwen2-VL that vLLM's
CPU attention can run (vlm/tiny.py VLLM_CPU_SPEC, fp32) and sample G completions for each of the same
bundled images (one `generate` call for all prompts, as a rollout worker's chunk); tokens/s counts
completion tokens. Each side gets a warm-up call first (vLLM: its start-up is reported apart). The random
model's answers end at random, so the two sides sample different lengths: tokens/s, not wall time, is the
comparable number. Greedy answers are checked equal first, so both run the same model on the same pixels.

Measured 2026-12-06 on the shared 2-core CI machine under load (other runs going): 4 prompts x G=8 x 32
tokens, HF 73.9 tokens/s, vLLM 3091 tokens/s (start-up 95 s). With 16 prompts x 8 seeded samples vLLM's CPU
build dies ("CPU Generator does not use offset": it rewinds a seeded CPU generator when a chunked prefill
discards a sampled token), so the default stays at 4 prompts; see docs/vllm.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tokens(groups) -> int:
    return sum(len(c.token_ids) for g in groups for c in g.completions)


def _time(engine, requests, sampling, repeats: int) -> tuple[float, int]:
    """Median tokens/s over `repeats` calls (after one warm-up call) and the tokens of the last call."""
    engine.generate(requests, sampling, seed=0)
    rates, tokens = [], 0
    for i in range(repeats):
        start = time.perf_counter()
        tokens = _tokens(engine.generate(requests, sampling, seed=i + 1))
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates), tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from actors.hf_engine import HFEngine
    from actors.vllm_adapter import LLMOptions
    from actors.vllm_engine import VLLMEngine
    from protocol.components import SamplingConfig
    from protocol.rollout import RolloutRequest
    from tasks.bundled import ensure_bundled
    from tasks.examples import build_examples, tokenizer_corpus
    from tasks.manifest import read_dataset
    from vlm.tiny import VLLM_CPU_SPEC, ensure_tiny_vlm

    data = read_dataset(ensure_bundled("shapes"))
    model = ensure_tiny_vlm(VLLM_CPU_SPEC, tokenizer_corpus([data]))
    hf = HFEngine(model)
    examples, _ = build_examples(hf.processor, data, data.split("train")[: args.prompts], "no_think",
                                 VLLM_CPU_SPEC.min_pixels, VLLM_CPU_SPEC.max_pixels, seed=0)
    requests = [RolloutRequest(e.id, e.inputs, e.solution) for e in examples]
    start = time.perf_counter()
    vllm = VLLMEngine(LLMOptions(model=str(model), dtype="float32", gpu_memory_utilization=0.05,
                                 max_model_len=512, enforce_eager=True, min_pixels=VLLM_CPU_SPEC.min_pixels,
                                 max_pixels=VLLM_CPU_SPEC.max_pixels))
    startup = time.perf_counter() - start
    greedy = SamplingConfig(n=1, max_new_tokens=8, greedy=True)
    same = [a.completions[0].token_ids == b.completions[0].token_ids
            for a, b in zip(vllm.generate(requests, greedy), hf.generate(requests, greedy))]
    if not all(same):
        raise SystemExit(f"greedy answers differ on {same.count(False)} of {len(same)} prompts")
    sampling = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)
    hf_rate, hf_tokens = _time(hf, requests, sampling, args.repeats)
    vllm_rate, vllm_tokens = _time(vllm, requests, sampling, args.repeats)
    result = {"prompts": len(requests), "n": args.n, "max_new_tokens": args.max_new_tokens,
              "hf_tokens_per_s": round(hf_rate, 1), "vllm_tokens_per_s": round(vllm_rate, 1),
              "speedup": round(vllm_rate / hf_rate, 2), "hf_tokens": hf_tokens, "vllm_tokens": vllm_tokens,
              "vllm_startup_s": round(startup, 1), "threads": torch.get_num_threads()}
    print("| engine | completion tokens/s | tokens in last call |\n|---|---|---|")
    print(f"| HF generate | {hf_rate:.1f} | {hf_tokens} |\n| vLLM (CPU build) | {vllm_rate:.1f} | {vllm_tokens} |")
    print(result)
    return result


if __name__ == "__main__":
    main()
