"""Rollout engines (HF generate here; vLLM on GPUs) behind one interface, hosted by Ray actors."""
