"""Per-layer precision (kvcomp.integrations.calibrate): the allocation is the
exact optimum of its cost model, and measure() wires layers and candidates
to the KL runs they name."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvcomp import policies  # noqa: E402
from kvcomp.bench.evaluate import teacher_forced  # noqa: E402
from kvcomp.integrations.calibrate import Calibration, default_candidates, measure  # noqa: E402
from kvcomp.integrations.hf import KVCompCache  # noqa: E402


def _calibration(costs, cands):
    names = [f"c{j}" for j in range(len(cands))]
    return Calibration(candidates={n: policies.full(name=n) for n in names},
                       bits={n: b for n, (b, _) in zip(names, cands)}, probe=names[0], layer_cost=costs,
                       scale={n: s for n, (_, s) in zip(names, cands)}, seq_len=2048, seconds=0.0)


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.floats(0, 1), min_size=1, max_size=4),
       cands=st.lists(st.tuples(st.integers(200, 500).map(lambda u: u / 100), st.floats(0, 2)),
                      min_size=1, max_size=3),
       budget=st.integers(200, 500).map(lambda u: u / 100))
def test_choose_is_the_brute_force_optimum(costs, cands, budget):
    cal = _calibration(costs, cands)
    names = list(cal.candidates)
    feasible = [c for c in itertools.product(names, repeat=len(costs))
                if sum(cal.bits[n] for n in c) <= budget * len(costs) + 1e-9]
    if not feasible:
        with pytest.raises(ValueError, match="bits"):
            cal.choose(budget)
        return
    choice = cal.choose(budget)
    assert len(choice) == len(costs)
    assert sum(cal.bits[n] for n in choice) <= budget * len(costs) + 1e-9
    assert cal.estimate(choice) == pytest.approx(min(cal.estimate(c) for c in feasible), abs=1e-12)


def test_choose_spends_bits_where_layers_are_sensitive():
    # two layers, one 100x more sensitive; room for one expensive layer
    cal = _calibration([0.01, 1.0], [(2.25, 1.0), (3.25, 0.2)])
    assert cal.choose(2.75) == ["c0", "c1"]
    assert cal.choose(3.25) == ["c1", "c1"] and cal.choose(2.25) == ["c0", "c0"]
    assert [p.name for p in cal.allocate(2.75)] == ["c0", "c1"]


def test_default_candidates_are_four_formats_at_five_windows():
    c = default_candidates()
    assert c["int3@64"].cold_format == policies.int3().cold_format and c["int3@64"].hot_window == 64
    assert c["k3v2@32"].cold_format == "nf3:g64:h/nf2:g64:h"
    assert {p.hot_window for p in c.values()} == {0, 16, 32, 64, 128} and len(c) == 20


@pytest.fixture(scope="module")
def model_and_text():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_measure_runs_each_layer_alone_and_each_candidate_everywhere(model_and_text):
    model, ids = model_and_text
    cands = {"full": policies.full(), "int2@0": policies.int2(hot_window=0), "int3@0": policies.int3(hot_window=0)}
    seen = []
    cal = measure(model, [ids], prefix=150, candidates=cands, chunk=64, progress=seen.append)
    assert seen == ["layer 0", "layer 1", "full", "int2@0", "int3@0"]
    assert cal.probe == "int2@0" and cal.bits == pytest.approx({"full": 16.0, "int2@0": 2.25, "int3@0": 3.25})
    # Runs agree to fp32 rounding, not bit for bit: about one process in four takes another CPU
    # kernel path (the same alternate values each time), which moves a KL by up to 1e-6 of itself
    # and full()'s from 0 to 1.4e-11 nats. Recomputed values are compared at 1e-5.
    assert cal.scale["full"] < 1e-9  # full() through KVCompCache is the uncompressed cache
    assert all(c >= 0 for c in cal.layer_cost) and sum(cal.layer_cost) > 0

    def log_probs(per_layer):
        cache = KVCompCache(policy=per_layer, config=model.config)
        return teacher_forced(model, ids, cache, 150, 64, keep_log_probs=True).log_probs
    ref = log_probs([policies.full()] * 2)
    kl = lambda q: float(max((ref.exp() * (ref - q)).sum(-1).mean(), 0.0))
    assert cal.layer_cost[0] != pytest.approx(cal.layer_cost[1], rel=0.5)  # the layers tell apart
    for i in range(2):
        alone = [cands["int2@0"] if j == i else policies.full() for j in range(2)]
        assert cal.layer_cost[i] == pytest.approx(kl(log_probs(alone)), rel=1e-5)
    assert cal.scale["int3@0"] * sum(cal.layer_cost) == pytest.approx(kl(log_probs([cands["int3@0"]] * 2)),
                                                                       rel=1e-5)
    assert cal.scale["int3@0"] < cal.scale["int2@0"]  # 3 bits change the predictions less than 2
    assert len(cal.allocate(3.0)) == 2


def test_a_saved_calibration_allocates_as_the_measured_one(tmp_path):
    cal = _calibration([0.3, 0.01, 2.0], [(2.25, 1.0), (3.25, 0.2), (4.5, 0.01)])
    cal.save(tmp_path / "cal.json")
    again = Calibration.load(tmp_path / "cal.json")
    assert again == cal and again.allocate(3.0) == cal.allocate(3.0)


def test_measure_rejects_bad_arguments(model_and_text):
    model, ids = model_and_text
    with pytest.raises(ValueError, match="texts"):
        measure(model, [ids[0]], prefix=150)
    with pytest.raises(ValueError, match="texts"):
        measure(model, [ids], prefix=ids.shape[1])
    with pytest.raises(ValueError, match="probe"):
        measure(model, [ids], prefix=150, candidates={"full": policies.full()}, probe="int9")
    with pytest.raises(ValueError, match="candidates"):
        measure(model, [ids], prefix=150, candidates={})
