"""Checks against serving engines, run in the engine's own Python (see vllm_worker.py).

Test-only helpers, not part of the package: tests/ imports them as `engines` (tests/conftest.py puts
tests/ on sys.path), integration_tests/conftest.py and benchmarks/protocol.py add tests/ for the same import.
"""
