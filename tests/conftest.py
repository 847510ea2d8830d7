"""Test configuration: hypothesis profiles and shared fixtures.

Profiles (select with KVCOMP_HYPOTHESIS_PROFILE=<name>):
  default   60 examples a test (some tests scale it, see helpers.examples),
            no deadline, derandomized (reproducible CI)
  thorough  5x the examples, random seeds
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

import helpers  # noqa: E402
import kvcomp  # noqa: E402,F401

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile("default", max_examples=60, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("KVCOMP_HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def make_cache():
    """Factory: make_cache(fmt, seq_lens, num_kv_heads, head_dim, block_size, seed, **kw)
    -> helpers.Cache (pool, shuffled -1-padded block tables, seq_lens, written data)."""
    def make(fmt, seq_lens, num_kv_heads, head_dim, block_size, seed=0, **kw):
        return helpers.build_cache(fmt, seq_lens, num_kv_heads, head_dim, block_size,
                                   helpers.gen_from(seed), **kw)
    return make


@pytest.fixture(scope="session")
def rand_kv():
    """Factory: rand_kv(shape, seed, dtype=float32, magnitude=1.0) -> heavy-tailed tensor."""
    def make(shape, seed=0, dtype=torch.float32, magnitude=1.0, **kw):
        return helpers.heavy_tailed(shape, helpers.gen_from(seed), dtype, magnitude, **kw)
    return make
