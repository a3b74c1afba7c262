"""Checks against serving engines, run in the engine's own Python (see vllm_worker.py)."""
