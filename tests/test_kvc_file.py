"""The .kvc file (docs/format.md): PagedKVCache.save/load and
KVCompCache.save/load.

Round trips are checked against the cache that was saved, continued side by
side: the same appends, attends, forgets and frees on both must give
bit-for-bit equal outputs, tier states (positions, scores), stats() and raw
bytes of the blocks in use. Every way a file can be wrong raises
KVCFileError with its own message; a failed save leaves no partial file."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvcomp
from kvcomp import KVCFileError, PagedKVCache, Policy, kvc_file, policies as P
from helpers import assert_same, examples, gen_from, heavy_tailed, held_stats

H, D, HQ = 2, 64, 4
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ================================================================= twins
class Twins:
    """Caches driven with the same inputs; every output must be equal."""

    def __init__(self, cache: PagedKVCache, seed: int = 0):
        self.caches, self.g = [cache], gen_from(seed)

    @property
    def c(self) -> PagedKVCache:
        return self.caches[0]

    def append(self, seqs, n: int):
        c = self.c
        for l in range(c.num_layers):
            k, v = (heavy_tailed((len(seqs), n, H, D), self.g, c.dtype) for _ in range(2))
            for x in self.caches:
                x.append(l, list(seqs), k, v)

    def attend(self, seqs):
        for l in range(self.c.num_layers):
            q = torch.randn(len(seqs), HQ, D, generator=self.g).to(self.c.dtype)
            outs = [x.attend(l, list(seqs), q) for x in self.caches]
            for o in outs[1:]:
                assert torch.equal(o.cpu(), outs[0].cpu()), f"attend differs in layer {l}"

    def each(self, method: str, *args):
        for x in self.caches:
            getattr(x, method)(*args)

    def reload(self, path):
        """Saves the first cache and adds its loaded copy to the twins."""
        self.c.save(path)
        self.caches.append(PagedKVCache.load(path))
        return self.caches[-1]


# ============================================================ round trips
ROUND_TRIP = [
    (P.full(), F16), (P.full(), F32), (P.fp8(), BF16), (P.int8(), F16), (P.int4(), F32),
    (P.kivi2(), F16), (P.streaming_llm(sinks=4, window=60), F16), (P.h2o(), F32), (P.combined(), BF16),
    # custom: small windows so the workload seals, evicts and overwrites
    (P.h2o(budget=32, hot_window=16, evict_every=3), F32),
    (P.streaming_llm(sinks=4, window=44, hot_window=16, cold_format="int8"), F32),
    (P.kivi2(hot_window=40), BF16), (P.kivi2(hot_window=0, block_size=16), F32),
    (Policy(cold_format="int8/int2:g64", hot_window=0), F16),
    (P.int4(hot_window=16, wipe="on_reuse"), F16),
    (P.h2o(budget=0.25, hot_window=16, wipe="on_reuse", cold_format="fp8_e5m2"), F32),
]


def pid(p: Policy) -> str:
    return f"{p.name}-{p.cold_format}-hw{p.hot_window}-{p.eviction}-{p.wipe}"


@pytest.mark.parametrize("policy,dtype", ROUND_TRIP, ids=[f"{pid(p)}-{str(d)[6:]}" for p, d in ROUND_TRIP])
def test_round_trip(policy, dtype, tmp_path):
    """Save mid-run, load, and continue both caches: appends (chunks and
    decode steps: seals, evictions, ring overwrites), attends, forget, free
    and a new sequence give equal outputs and equal state throughout."""
    t = Twins(PagedKVCache(2, H, D, policy, max_tokens=1024, dtype=dtype, max_seqs=4), seed=len(pid(policy)))
    for s in ("a", "b", 7):
        t.each("add_sequence", s)
    t.append(["a"], 150)
    for n in (10, 1, 26):
        t.append(["b", 7], n)
    for _ in range(5):
        t.append(["a", "b", 7], 1)
        t.attend(["a", "b", 7])
    t.each("forget", "b", 3, 9)
    loaded = t.reload(tmp_path / "c.kvc")
    assert_same(t.c, loaded)
    for _ in range(6):
        t.append(["a", "b", 7], 1)
        t.attend([7, "a", "b"])
    t.append(["b"], 70)
    t.attend(["b", "a"])
    t.each("forget", "a", 20, 40)
    t.each("free", 7)
    t.each("add_sequence", "d")
    t.append(["d", "a"], 33)
    t.attend(["d", "a", "b"])
    assert_same(t.c, loaded)
    # a loaded cache saves to the same bytes
    loaded.save(tmp_path / "again.kvc")
    t.c.save(tmp_path / "orig.kvc")
    assert (tmp_path / "again.kvc").read_bytes() == (tmp_path / "orig.kvc").read_bytes()


HYPO_POLICIES = [P.full(), P.int8(), P.int4(hot_window=16), P.kivi2(hot_window=40), P.fp8(wipe="on_reuse"),
                 P.streaming_llm(sinks=4, window=44), P.h2o(budget=32, hot_window=16),
                 P.combined(budget=0.5, hot_window=32, wipe="on_reuse")]
action = st.one_of(
    st.tuples(st.just("append"), st.sampled_from([("a",), ("b",), ("a", "b")]), st.integers(1, 50)),
    st.tuples(st.just("attend"), st.sampled_from([("a",), ("b", "a")]), st.just(0)),
    st.tuples(st.just("forget"), st.sampled_from(["a", "b"]), st.integers(0, 60)),
    st.tuples(st.just("save_load"), st.sampled_from([None, ("a",), ("b",)]), st.just(0)),
)


@settings(max_examples=examples(10))
@given(policy=st.sampled_from(HYPO_POLICIES), dtype=st.sampled_from([F32, F16, BF16]),
       actions=st.lists(action, min_size=1, max_size=8), seed=st.integers(0, 2**31 - 1))
def test_round_trip_random_operations(policy, dtype, actions, seed, tmp_path):
    """Save/load (all sequences or one) anywhere in a random run: the loaded
    cache replaces the original and the run goes on unchanged."""
    c = PagedKVCache(1, H, D, policy, max_tokens=512, dtype=dtype, max_seqs=2)
    t = Twins(c, seed)
    t.caches.append(PagedKVCache(1, H, D, policy, max_tokens=512, dtype=dtype, max_seqs=2))  # never saved
    for s in ("a", "b"):
        t.each("add_sequence", s)
    for kind, arg, n in actions:
        if kind == "append":
            t.append(list(arg), n)
        elif kind == "attend":
            t.attend(list(arg))
        elif kind == "forget":
            t.each("forget", arg, n, n + 10)
        else:
            t.c.save(tmp_path / "h.kvc", seq_ids=arg)
            loaded = PagedKVCache.load(tmp_path / "h.kvc")
            for s in [s for s in t.c.sequences if s not in loaded.sequences]:  # not saved: empty again
                t.caches[1].free(s)
                t.caches[1].add_sequence(s)
                loaded.add_sequence(s)
            t.caches[0] = loaded
        assert_same(*t.caches)
        t.attend(["a", "b"])


def test_save_subset(tmp_path):
    """save(seq_ids=...) writes only those sequences: the loaded cache equals
    the whole cache with the others freed."""
    t = Twins(PagedKVCache(2, H, D, P.int4(hot_window=16), max_tokens=1024, dtype=F16))
    for s in ("a", "b", "c"):
        t.each("add_sequence", s)
    t.append(["a", "b", "c"], 90)
    t.c.save(tmp_path / "all.kvc")
    t.c.save(tmp_path / "sub.kvc", seq_ids=["c", "a"])
    whole, sub = PagedKVCache.load(tmp_path / "all.kvc"), PagedKVCache.load(tmp_path / "sub.kvc")
    assert sub.sequences == ["c", "a"]
    whole.free("b")
    whole._seqs = {s: whole._seqs[s] for s in ("c", "a")}
    assert_same(whole, sub)
    assert (tmp_path / "sub.kvc").stat().st_size < (tmp_path / "all.kvc").stat().st_size
    q = torch.randn(2, HQ, D).half()
    assert torch.equal(sub.attend(1, ["a", "c"], q), t.c.attend(1, ["a", "c"], q))


def test_empty_caches_and_sequences(tmp_path):
    for policy in (P.full(), P.h2o(budget=32, hot_window=16), P.streaming_llm(sinks=4, window=60)):
        c = PagedKVCache(3, H, D, policy, max_tokens=256, dtype=F32)
        c.save(tmp_path / "empty.kvc")
        d = PagedKVCache.load(tmp_path / "empty.kvc")
        assert d.sequences == [] and held_stats(d) == held_stats(c)
        c.add_sequence("x")
        c.save(tmp_path / "x.kvc")
        d = PagedKVCache.load(tmp_path / "x.kvc")
        assert_same(c, d)
        assert bool((d.attend(2, ["x"], torch.randn(1, HQ, D)) == 0).all())


def test_only_used_blocks_are_stored(tmp_path):
    """The file grows with the blocks in use, not with the pools' capacity."""
    sizes = []
    for max_tokens in (1024, 65536):
        c = PagedKVCache(2, H, D, P.int8(), max_tokens=max_tokens, dtype=F16)
        c.add_sequence(0)
        c.append(0, [0], torch.randn(1, 40, H, D).half(), torch.randn(1, 40, H, D).half())
        c.save(tmp_path / f"{max_tokens}.kvc")
        sizes.append((tmp_path / f"{max_tokens}.kvc").stat().st_size)
        header, tensors = kvc_file.read(tmp_path / f"{max_tokens}.kvc", "PagedKVCache")
        assert tensors["cold.0"].shape[0] == 3 and tensors["cold.1"].shape[0] == 0
        assert torch.equal(tensors["cold.0"], c.cold_pools[0][:3])
    assert abs(sizes[0] - sizes[1]) < 16  # the header's max_tokens digits only


def test_header_is_self_describing(tmp_path):
    c = PagedKVCache(2, H, D, P.h2o(budget=32, hot_window=16, wipe="on_reuse"), max_tokens=512, dtype=BF16,
                     max_seqs=3)
    c.add_sequence("a")
    c.append(0, ["a"], torch.randn(1, 50, H, D).bfloat16(), torch.randn(1, 50, H, D).bfloat16())
    c.save(tmp_path / "c.kvc")
    raw = (tmp_path / "c.kvc").read_bytes()
    magic, version, n = struct.unpack_from("<8sIQ", raw)
    assert magic == kvc_file.MAGIC and version == 2
    header = json.loads(raw[20:20 + n])
    assert header["format"] == "kvcomp.kvc" and header["format_version"] == 2 and header["integrity"] == "sha256"
    assert header["kvcomp_version"] == kvcomp.__version__ and header["layout_version"] == kvcomp.LAYOUT_VERSION
    e = header["cache"]
    assert e["geometry"] == {"num_layers": 2, "num_kv_heads": H, "head_dim": D, "dtype": "bfloat16"}
    assert Policy(**e["policy"]) == c.policy and e["policy"]["wipe"] == "on_reuse"
    assert (e["max_tokens"], e["max_seqs"], e["hot_format"], e["cold_format"]) == (512, 3, "bf16", "fp16")
    layer0, layer1 = e["sequences"][0]["layers"]
    assert layer0["seen"] == 50 and layer0["hot"]["len"] + layer0["cold"]["len"] == c.held("a")
    assert layer1 == {"seen": 0, "hot": {"len": 0, "blocks": []}, "cold": {"len": 0, "blocks": []}}
    assert raw[-32:] == hashlib.sha256(raw[:-32]).digest()


# ================================================================= errors
def _saved(tmp_path, name="c.kvc") -> bytes:
    c = PagedKVCache(2, H, D, P.int4(hot_window=16), max_tokens=256, dtype=F16)
    c.add_sequence("a")
    for l in range(2):
        c.append(l, ["a"], torch.randn(1, 40, H, D).half(), torch.randn(1, 40, H, D).half())
    c.save(tmp_path / name)
    return (tmp_path / name).read_bytes()


def _reframe(raw: bytes, version: int = 2, edit=None) -> bytes:
    """A file with a new format version and/or edited header, checksum redone."""
    _, _, n = struct.unpack_from("<8sIQ", raw)
    header = json.loads(raw[20:20 + n])
    if edit:
        edit(header)
    head = json.dumps(header).encode()
    body = struct.pack("<8sIQ", kvc_file.MAGIC, version, len(head)) + head + raw[20 + n:-32]
    return body + hashlib.sha256(body).digest()


def _load_error(path) -> str:
    with pytest.raises(KVCFileError) as e:
        PagedKVCache.load(path)
    assert isinstance(e.value, ValueError) and str(path) in str(e.value)
    return str(e.value)


def test_foreign_files(tmp_path):
    from safetensors.torch import save_file
    cases = {"empty.kvc": (b"", "empty"), "text.kvc": (b"hello, I am a text file\n", "not a .kvc file"),
             "short.kvc": (b"xy", "not a .kvc file")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert msg in _load_error(tmp_path / name)
    save_file({"x": torch.zeros(3)}, tmp_path / "plain.safetensors")
    assert "plain safetensors file" in _load_error(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        PagedKVCache.load(tmp_path / "missing.kvc")


def test_truncated(tmp_path):
    raw = _saved(tmp_path)
    for cut in sorted({1, 7, 8, 19, 20, 25, 100, len(raw) // 2, len(raw) - 33, len(raw) - 32, len(raw) - 1}):
        (tmp_path / "cut.kvc").write_bytes(raw[:cut])
        assert "truncated" in _load_error(tmp_path / "cut.kvc"), cut


def test_corrupted(tmp_path):
    """A flipped bit anywhere is caught: in the header or payload (and the
    checksum itself) by the SHA-256; in the framing by its own checks."""
    raw = _saved(tmp_path)
    n = struct.unpack_from("<Q", raw, 12)[0]
    header_and_payload = list(range(20, len(raw), 97)) + [20, 20 + n - 1, 20 + n + 8, len(raw) - 1]
    for i in header_and_payload:
        for bit in (0, 7):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            (tmp_path / "bad.kvc").write_bytes(bad)
            msg = _load_error(tmp_path / "bad.kvc")
            assert "corrupted" in msg or (20 + n <= i < 28 + n and "truncated" in msg), (i, msg)
    for i in range(20):  # magic, version, header length
        bad = bytearray(raw)
        bad[i] ^= 0x10
        (tmp_path / "bad.kvc").write_bytes(bad)
        _load_error(tmp_path / "bad.kvc")
    (tmp_path / "long.kvc").write_bytes(raw + b"\0")
    assert "corrupted" in _load_error(tmp_path / "long.kvc")


def test_wrong_versions_and_kind(tmp_path):
    raw = _saved(tmp_path)
    (tmp_path / "v3.kvc").write_bytes(_reframe(raw, version=3))
    assert "format version 3 is not supported" in _load_error(tmp_path / "v3.kvc")
    (tmp_path / "layout.kvc").write_bytes(_reframe(raw, edit=lambda h: h.update(layout_version=99)))
    assert "layout version 99" in _load_error(tmp_path / "layout.kvc")
    (tmp_path / "kind.kvc").write_bytes(_reframe(raw, edit=lambda h: h.update(kind="hf.KVCompCache")))
    assert "KVCompCache.load" in _load_error(tmp_path / "kind.kvc")
    (tmp_path / "fmt.kvc").write_bytes(_reframe(raw, edit=lambda h: h.update(format="other")))
    assert "kvcomp.kvc" in _load_error(tmp_path / "fmt.kvc")
    # a consistent frame around an inconsistent header: still no partial cache, an error
    (tmp_path / "seqs.kvc").write_bytes(_reframe(raw, edit=lambda h: h["cache"]["sequences"].append(
        h["cache"]["sequences"][0])))
    assert "listed twice" in _load_error(tmp_path / "seqs.kvc")
    (tmp_path / "blk.kvc").write_bytes(_reframe(raw, edit=lambda h: h["cache"]["sequences"][0]["layers"][0]
                                                ["cold"].update(blocks=[0, 0])))
    assert "exactly once" in _load_error(tmp_path / "blk.kvc")
    (tmp_path / "pol.kvc").write_bytes(_reframe(raw, edit=lambda h: h["cache"]["policy"].update(wipe="never")))
    assert "policy: wipe" in _load_error(tmp_path / "pol.kvc")


def test_expected_geometry(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "c.kvc"
    for kw, msg in ((dict(head_dim=128), "head_dim=64, expected head_dim=128"),
                    (dict(num_kv_heads=8), "num_kv_heads=2, expected num_kv_heads=8"),
                    (dict(num_layers=32), "num_layers=2, expected num_layers=32"),
                    (dict(dtype=BF16), "dtype=torch.float16, expected dtype=torch.bfloat16")):
        with pytest.raises(KVCFileError, match=msg):
            PagedKVCache.load(path, **kw)
    c = PagedKVCache.load(path, num_layers=2, num_kv_heads=H, head_dim=D, dtype=F16)
    assert c.held("a") == 40


def test_save_rejects_bad_seq_ids(tmp_path):
    c = PagedKVCache(1, H, D, P.int8(), max_tokens=256)
    c.add_sequence(("a", 1))
    c.add_sequence("b")
    with pytest.raises(KeyError, match="zz"):
        c.save(tmp_path / "x.kvc", seq_ids=["zz"])
    with pytest.raises(ValueError, match="seq_ids"):
        c.save(tmp_path / "x.kvc")
    with pytest.raises(ValueError, match="duplicates"):
        c.save(tmp_path / "x.kvc", seq_ids=["b", "b"])
    assert not list(tmp_path.iterdir())
    c.save(tmp_path / "x.kvc", seq_ids=["b"])
    assert PagedKVCache.load(tmp_path / "x.kvc").sequences == ["b"]


# ================================================================ atomic
class _FailingFile:
    """Wraps a file: the second write raises (a full disk mid-save)."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, b):
        self.writes += 1
        if self.writes == 2:
            raise OSError(28, "No space left on device")
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
@pytest.mark.parametrize("existing", [False, True])
def test_crash_mid_save_leaves_no_partial_file(tmp_path, monkeypatch, where, existing):
    old = _saved(tmp_path, "target.kvc") if existing else None
    c = PagedKVCache(1, H, D, P.full(), max_tokens=256, dtype=F32)
    c.add_sequence(0)
    c.append(0, [0], torch.randn(1, 30, H, D), torch.randn(1, 30, H, D))
    boom = OSError(5, "simulated crash")

    def raise_(*a, **k):
        raise boom
    if where == "write":
        monkeypatch.setattr(kvc_file, "open", lambda *a, **k: _FailingFile(open(*a, **k)), raising=False)
    else:
        monkeypatch.setattr(os, where, raise_)
    with pytest.raises(OSError):
        c.save(tmp_path / "target.kvc")
    monkeypatch.undo()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["target.kvc"] if existing else []), f"left behind: {left}"
    if existing:
        assert (tmp_path / "target.kvc").read_bytes() == old
    c.save(tmp_path / "target.kvc")  # and a save that goes through replaces it
    assert_same(c, PagedKVCache.load(tmp_path / "target.kvc"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.kvc"]


def test_save_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")), real(fd)))
    _saved(tmp_path)
    if os.name == "posix" and os.path.isdir("/proc/self/fd"):
        assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == os.path.realpath(tmp_path)


def test_file_mode_follows_umask(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    mask = os.umask(0o022)
    try:
        _saved(tmp_path)
    finally:
        os.umask(mask)
    assert (tmp_path / "c.kvc").stat().st_mode & 0o777 == 0o644


# ================================================================= device
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_to_cuda_to_cpu(tmp_path):
    """Blocks move between devices byte for byte; the CUDA cache works on."""
    for policy in (P.int4(hot_window=16), P.h2o(budget=32, hot_window=16), P.streaming_llm(sinks=4, window=44)):
        t = Twins(PagedKVCache(2, H, D, policy, max_tokens=512, dtype=F16), seed=3)
        t.each("add_sequence", "a")
        t.append(["a"], 100)
        t.attend(["a"])
        t.c.save(tmp_path / "cpu.kvc")
        gpu = PagedKVCache.load(tmp_path / "cpu.kvc", device="cuda")
        assert gpu.device.type == "cuda" and all(p.is_cuda for p in gpu.hot_pools + gpu.cold_pools)
        assert_same(t.c, gpu)
        gpu.save(tmp_path / "gpu.kvc")
        back = PagedKVCache.load(tmp_path / "gpu.kvc", device="cpu")
        assert_same(t.c, back)
        t.caches.append(back)
        t.append(["a"], 40)
        t.attend(["a"])
        q = torch.randn(1, HQ, D).half()
        gpu.append(0, ["a"], torch.randn(1, 3, H, D).half().cuda(), torch.randn(1, 3, H, D).half().cuda())
        assert torch.isfinite(gpu.attend(0, ["a"], q.cuda())).all()


def test_load_onto_cpu_device_argument(tmp_path):
    _saved(tmp_path)
    c = PagedKVCache.load(tmp_path / "c.kvc", device="cpu")
    assert c.device == torch.device("cpu") and c.hot_pools[0].device.type == "cpu"
    c = PagedKVCache.load(tmp_path / "c.kvc", device=torch.device("cpu"))
    assert c.held("a", 1) == 40


# ===================================================== Hugging Face cache
_CONTINUE = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from transformers import LlamaForCausalLM
    from kvcomp.integrations.hf import KVCompCache
    job = json.loads(sys.argv[1])
    model = LlamaForCausalLM.from_pretrained(job["model"]).eval()
    ids = torch.tensor(job["ids"])
    out = []
    for case in job["cases"]:
        model.set_attn_implementation(case["attn"])
        cache = KVCompCache.load(case["file"], config=model.config)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                 max_new_tokens=job["new"], min_new_tokens=job["new"], do_sample=False,
                                 pad_token_id=0)
        out.append(gen.tolist())
    print(json.dumps(out))
""")


def test_hf_cache_continues_in_a_new_process(tmp_path):
    """Prefill, save the KVCompCache; a new process loads the saved model and
    the cache and generates greedily: the same tokens as going on in-process."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    from kvcomp.integrations.hf import KVCompCache
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(3, 512, (2, 40), generator=gen_from(1))
    new = 12
    cases, want = [], []
    for i, (policy, attn) in enumerate(((P.int4(hot_window=16), "kvcomp"),
                                        (P.h2o(budget=16, hot_window=16), "kvcomp"),
                                        (P.combined(budget=16), "kvcomp"))):  # observe: prompt held until decode
        model.set_attn_implementation(attn)
        cache = KVCompCache(policy=policy, max_tokens=1024)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        cache.save(tmp_path / f"{i}.kvc")
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        want.append(gen.tolist())
        cases.append({"file": str(tmp_path / f"{i}.kvc"), "attn": attn})
    job = {"model": str(tmp_path / "model"), "ids": ids.tolist(), "new": new, "cases": cases}
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(kvcomp.__file__)))
    r = subprocess.run([sys.executable, "-c", _CONTINUE, json.dumps(job)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == want


def test_hf_cache_round_trip_and_checks(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from kvcomp.integrations.hf import KVCompCache
    cache = KVCompCache(policy=P.kivi2(hot_window=40), max_tokens=512)
    for l in range(3):
        cache.update(torch.randn(2, H, 50, D), torch.randn(2, H, 50, D), l)
    cache.layers[1].native = True
    cache.save(tmp_path / "hf.kvc")
    back = KVCompCache.load(tmp_path / "hf.kvc")
    assert (back.policy, back.max_tokens, len(back.layers)) == (cache.policy, 512, 3)
    assert back.stats() == cache.stats() and back.get_seq_length() == 50
    for a, b in zip(cache.layers, back.layers):
        assert (a.native, a.pending_evict, a.batch_size, a.dtype) == (b.native, b.pending_evict, b.batch_size, b.dtype)
        assert b.is_initialized and b.owner is back
        assert_same(a.cache, b.cache)
    config = lambda **kw: LlamaConfig(**{**dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=H,
                                                hidden_size=256, head_dim=D), **kw})
    KVCompCache.load(tmp_path / "hf.kvc", config=config())
    for kw, msg in ((dict(num_hidden_layers=4), "3 layers, the model 4"),
                    (dict(num_key_value_heads=4), "num_kv_heads=2, expected num_kv_heads=4"),
                    (dict(head_dim=128), "head_dim=64, expected head_dim=128")):
        with pytest.raises(KVCFileError, match=msg):
            KVCompCache.load(tmp_path / "hf.kvc", config=config(**kw))
    _saved(tmp_path)
    with pytest.raises(KVCFileError, match="PagedKVCache.load"):
        KVCompCache.load(tmp_path / "c.kvc")
    with pytest.raises(KVCFileError, match="KVCompCache.load"):
        PagedKVCache.load(tmp_path / "hf.kvc")
    KVCompCache().save(tmp_path / "none.kvc")
    assert KVCompCache.load(tmp_path / "none.kvc").layers == []
