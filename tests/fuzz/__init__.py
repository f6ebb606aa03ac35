"""Helpers of the concurrent differential fuzz (tests/test_fuzz_concurrent.py)."""
