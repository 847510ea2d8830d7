"""Files that cannot be trusted (issue: memory files you can trust): every
field and value of a .kvc file is validated on load, whatever its checksum
says; ``key=`` signs a file (HMAC-SHA256), ``encrypt_key=`` encrypts it
(AES-256-GCM). Hostile files are built by editing a real file and
recomputing its SHA-256, as anyone could."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from kvcomp import KVCFileError, PagedKVCache, Policy, kvc_file, policies as P
from helpers import gen_from, heavy_tailed

H, D = 2, 64
F16, F32 = torch.float16, torch.float32
KEY, OTHER = b"k" * 32, b"o" * 32


def make(policy=None, dtype=F16, n=40, layers=2, attend=False, seed=0) -> PagedKVCache:
    c = PagedKVCache(layers, H, D, policy or P.int4(hot_window=16), max_tokens=256, dtype=dtype)
    g = gen_from(seed)
    for s in ("a", "b"):
        c.add_sequence(s)
        for l in range(layers):
            k, v = (heavy_tailed((1, n, H, D), g, dtype) for _ in range(2))
            c.append(l, [s], k, v)
            if attend:
                c.attend(l, [s], torch.randn(1, 2 * H, D, generator=g).to(dtype))
    return c


def saved(tmp_path, cache=None, **kw) -> bytes:
    (cache or make()).save(tmp_path / "c.kvc", **kw)
    return (tmp_path / "c.kvc").read_bytes()


def split(raw: bytes) -> tuple[dict, dict]:
    _, _, n = struct.unpack_from("<8sIQ", raw)
    from safetensors.torch import load
    return json.loads(raw[20:20 + n]), load(raw[28 + n:-32])


def frame(header: dict, tensors: dict, version: int = 2) -> bytes:
    """A well-framed file with a valid SHA-256: what anyone can write."""
    from safetensors.torch import save
    head, payload = json.dumps(header).encode(), save(tensors)
    body = struct.pack("<8sIQ", kvc_file.MAGIC, version, len(head)) + head + struct.pack("<Q", len(payload)) + payload
    return body + hashlib.sha256(body).digest()


def edited(raw: bytes, header=None, tensors=None) -> bytes:
    h, t = split(raw)
    if header:
        header(h)
    if tensors:
        tensors(t)
    return frame(h, t)


def rejected(tmp_path, data: bytes, match: str, **load) -> str:
    (tmp_path / "bad.kvc").write_bytes(data)
    with pytest.raises(KVCFileError, match=match) as e:
        PagedKVCache.load(tmp_path / "bad.kvc", **load)
    return str(e.value)


def seq_layer(h, i=0, l=0) -> dict:
    return h["cache"]["sequences"][i]["layers"][l]


def set_bytes(t: torch.Tensor, offset: int, values: torch.Tensor) -> None:
    """Writes values' bytes at byte ``offset`` of every tile of block tensor t."""
    b = values.view(torch.uint8).flatten()
    t[:, :, offset:offset + b.numel()] = b


# ======================================================= hostile files
def test_the_hostile_files_of_the_issue(tmp_path):
    """NaN in fp32 hot blocks, max_tokens = 2**40, a negative position, seen = -7."""
    raw = saved(tmp_path, make(P.int4(hot_window=16), F32))
    nan = lambda t: set_bytes(t["hot.0"], 0, torch.tensor([float("nan")]))
    assert "hot.0: K values" in rejected(tmp_path, edited(raw, tensors=nan), "NaN")
    big = lambda h: h["cache"].update(max_tokens=2**40)  # a cap: loads, allocating the stored blocks only
    (tmp_path / "big.kvc").write_bytes(edited(raw, header=big))
    assert PagedKVCache.load(tmp_path / "big.kvc").stats()["capacity_bytes"] == make(dtype=F32).stats()["bytes"]

    def negative(t):
        t["pos"][0, 0] = -1
    rejected(tmp_path, edited(raw, tensors=negative), r"positions: outside \[0, seen=")
    rejected(tmp_path, edited(raw, header=lambda h: seq_layer(h).update(seen=-7)), r"layers\[0\].seen: -7 is not")
    assert PagedKVCache.load(tmp_path / "c.kvc").held("a") == 40


@pytest.mark.parametrize("policy,where,offset_of,value,match", [
    # fp16 scale of the first token's first group: Inf, NaN
    (P.int4(hot_window=16), "cold", "k.meta", float("inf"), "K scales/zeros"),
    (P.int4(hot_window=16), "cold", "v.meta", float("nan"), "V scales/zeros"),
    # a scale a writer never makes for an fp16 cache: its codes decode beyond fp16
    (P.int4(hot_window=16), "cold", "k.meta", 60000.0, "decode to values beyond fp16"),
    (Policy(cold_format="nf4:h", hot_window=16), "cold", "v.meta", 30000.0, "decode to values beyond fp16"),
])
def test_bad_metadata(tmp_path, policy, where, offset_of, value, match):
    raw = saved(tmp_path, make(policy))
    fmt = policy.cold_format
    from kvcomp import KVFormat
    side, region = offset_of.split(".")
    lay = KVFormat.parse(fmt).layout(D, policy.block_size)[side]

    def edit(t):
        set_bytes(t[f"{where}.0"], lay["meta_offset"], torch.full((lay["meta_bytes"] // 2,), value, dtype=F16))
    rejected(tmp_path, edited(raw, tensors=edit), match)


@pytest.mark.parametrize("fmt,code", [("int8", 0x80), ("fp8_e4m3", 0x7F), ("fp8_e4m3", 0xFF), ("fp8_e5m2", 0x7C),
                                      ("fp8_e5m2", 0xFE)])
def test_codes_a_writer_never_stores(tmp_path, fmt, code):
    policy = Policy(cold_format=fmt, hot_window=16)
    raw = saved(tmp_path, make(policy))

    def edit(t):
        t["cold.0"][0, 0, 5] = code
    rejected(tmp_path, edited(raw, tensors=edit), "codes: hold a code")


def test_large_but_legitimate_values_load(tmp_path):
    """Values near what the format stores (not a hostile file) load."""
    for policy in (P.int8(hot_window=16), Policy(cold_format="nf4:h", hot_window=16), P.int4(hot_window=16)):
        c = PagedKVCache(1, H, D, policy, max_tokens=256, dtype=F16)
        c.add_sequence("a")
        top = c._storable_max[0]
        k = heavy_tailed((1, 40, H, D), gen_from(1), F32)
        k = (k / k.abs().amax() * top * 0.3).half()
        c.append(0, ["a"], k, k)
        c.save(tmp_path / "c.kvc")
        out = PagedKVCache.load(tmp_path / "c.kvc").attend(0, ["a"], torch.randn(1, 2 * H, D).half())
        assert torch.isfinite(out).all()


def test_scores(tmp_path):
    policy = P.h2o(budget=32, hot_window=16)
    raw = saved(tmp_path, make(policy, F32, attend=True))
    for bad in (float("nan"), -1.0, float("inf")):
        def edit(t, bad=bad):
            t["scores"][1, 3] = bad
        rejected(tmp_path, edited(raw, tensors=edit), "scores: holds a negative, NaN or infinite score")


def test_positions(tmp_path):
    raw = saved(tmp_path)

    def dup(t):
        t["pos"][:, 1] = t["pos"][:, 0]

    def beyond(t):
        t["pos"][:, 0] = 10**6

    def heads_differ(t):  # head 1 holds the same tokens in other slots: only H2O's heads differ
        t["pos"][1, :2] = t["pos"][1, :2].flip(0).clone()
    rejected(tmp_path, edited(raw, tensors=dup), "held twice")
    rejected(tmp_path, edited(raw, tensors=beyond), "outside")
    rejected(tmp_path, edited(raw, tensors=heads_differ), "KV heads hold different positions")


@pytest.mark.parametrize("edit,match", [
    (lambda h: seq_layer(h)["hot"].update(len=10**9), r"hot.blocks: must list|hot.len"),
    (lambda h: seq_layer(h)["hot"].update(len=-1), r"hot.len: -1 is not"),
    (lambda h: seq_layer(h)["cold"].update(blocks=[0, 1.0]), r"cold.blocks"),
    (lambda h: h["cache"]["sequences"][1].update(id=[1]), r"sequences\[1\].id"),
    (lambda h: h["cache"].update(max_seqs=0), r"max_seqs: 0 is not"),
    (lambda h: h["cache"].update(max_tokens=16), r"max_tokens: the cold pool holds at most 1 blocks"),
    (lambda h: h["cache"]["geometry"].update(num_layers=10**6), r"geometry.num_layers"),
    (lambda h: h["cache"]["geometry"].update(head_dim=48), r"head_dim|tensor hot.0"),
    (lambda h: h["cache"]["policy"].update(hot_window=16.0), r"policy: hot_window must be"),
    (lambda h: h["cache"]["policy"].update(cold_format="int4/int4"), r"policy: .* is not as Policy writes it"),
    (lambda h: h["cache"]["policy"].update(colour="red"), r"policy: .*colour"),
    (lambda h: h["cache"].update(cold_format="int8"), r"cold_format: the blocks are 'int8'"),
    (lambda h: h["cache"].pop("sequences"), r"cache.sequences: missing"),
    (lambda h: h.update(cache=[]), r"cache: must be a JSON object"),
])
def test_header_fields(tmp_path, edit, match):
    rejected(tmp_path, edited(saved(tmp_path), header=edit), match)


def test_tensors_missing_extra_or_misshapen(tmp_path):
    raw = saved(tmp_path)
    rejected(tmp_path, edited(raw, tensors=lambda t: t.pop("cold.1")), "tensor cold.1: missing")
    rejected(tmp_path, edited(raw, tensors=lambda t: t.update(x=torch.zeros(2))), "tensors the header does not use")
    rejected(tmp_path, edited(raw, tensors=lambda t: t.update(pos=t["pos"].int())), "tensor pos: is torch.int32")
    rejected(tmp_path, edited(raw, tensors=lambda t: t.update({"hot.0": t["hot.0"][..., :-16].clone()})),
             "tensor hot.0: is torch.uint8")


def test_a_header_cannot_make_a_load_allocate(tmp_path):
    """Pools grow on demand: a load allocates the stored blocks and nothing
    more, whatever caps (max_tokens, max_seqs) the header names."""
    c = make()
    raw = saved(tmp_path, c)
    for edit in (lambda h: h["cache"].update(max_tokens=2**40), lambda h: h["cache"].update(max_seqs=2**40),
                 lambda h: h["cache"].update(max_tokens=None)):
        (tmp_path / "big.kvc").write_bytes(edited(raw, header=edit))
        big = PagedKVCache.load(tmp_path / "big.kvc")
        assert big.stats()["capacity_bytes"] == big.stats()["bytes"] == c.stats()["bytes"]
    assert big.max_tokens is None
    rejected(tmp_path, edited(raw, header=lambda h: h["cache"].update(max_tokens=2**40 + 0.5)), "max_tokens")


def test_version_1_files_still_load(tmp_path):
    raw = saved(tmp_path)
    h, t = split(raw)
    h.pop("integrity")
    h["format_version"] = 1
    (tmp_path / "v1.kvc").write_bytes(frame(h, t, version=1))
    assert PagedKVCache.load(tmp_path / "v1.kvc").held("b") == 40
    with pytest.raises(KVCFileError, match="not signed"):
        PagedKVCache.load(tmp_path / "v1.kvc", key=KEY)


def test_load_report(tmp_path):
    saved(tmp_path)
    r = PagedKVCache.load(tmp_path / "c.kvc").load_report
    assert set(r) >= {"bytes", "read_s", "verify_s", "validate_s", "build_s", "total_s", "validate_fraction"}
    assert r["bytes"] == (tmp_path / "c.kvc").stat().st_size and 0 < r["validate_fraction"] < 1


# ============================================================ signing
def attend_all(c: PagedKVCache) -> list:
    g = gen_from(9)
    q = torch.randn(2, 2 * H, D, generator=g).to(c.dtype)
    return [c.attend(l, ["a", "b"], q) for l in range(c.num_layers)]


def test_signed_files(tmp_path):
    c = make()
    raw = saved(tmp_path, c, key=KEY)
    assert json.loads(raw[20:20 + struct.unpack_from("<Q", raw, 12)[0]])["integrity"] == "hmac-sha256"
    loaded = PagedKVCache.load(tmp_path / "c.kvc", key=KEY)
    assert all(torch.equal(a, b) for a, b in zip(attend_all(c), attend_all(loaded)))
    with pytest.raises(KVCFileError, match="signed with a key"):
        PagedKVCache.load(tmp_path / "c.kvc")
    with pytest.raises(KVCFileError, match="HMAC-SHA256 does not match"):
        PagedKVCache.load(tmp_path / "c.kvc", key=OTHER)
    # changed by someone without the key: as a signed file, or passed off as an unsigned one
    for fake in (edited(raw, tensors=lambda t: t["pos"].__setitem__((0, 0), 1)),
                 edited(raw, header=lambda h: h.update(integrity="sha256"))):
        rejected(tmp_path, fake, "HMAC-SHA256 does not match|not signed", key=KEY)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 1
    rejected(tmp_path, bytes(flipped), "HMAC-SHA256 does not match", key=KEY)
    saved(tmp_path)  # unsigned
    with pytest.raises(KVCFileError, match="not signed"):
        PagedKVCache.load(tmp_path / "c.kvc", key=KEY)


def test_key_arguments(tmp_path):
    c = make()
    with pytest.raises(ValueError, match="key must be at least 16 bytes"):
        c.save(tmp_path / "c.kvc", key=b"short")
    with pytest.raises(TypeError, match="key must be bytes"):
        c.save(tmp_path / "c.kvc", key="a string key")
    with pytest.raises(ValueError, match="encrypt_key must be exactly 32 bytes"):
        c.save(tmp_path / "c.kvc", encrypt_key=b"x" * 16)
    assert not list(tmp_path.iterdir())


# ========================================================= encryption
def test_encrypted_files_hide_every_byte_of_the_cache(tmp_path):
    pytest.importorskip("cryptography")
    c = make(P.h2o(budget=32, hot_window=16), attend=True)
    plain = saved(tmp_path, c)
    raw = saved(tmp_path, c, encrypt_key=KEY)
    _, tensors = split(plain)
    secrets = [t.contiguous().view(torch.uint8).flatten().numpy().tobytes() for t in tensors.values()]
    chunks = [s[i:i + 16] for s in secrets for i in range(0, len(s) - 15, 16) if len(set(s[i:i + 16])) > 2]
    assert chunks and all(ch in plain for ch in chunks)  # the search finds them in a clear file
    assert not any(ch in raw for ch in chunks)
    header = json.loads(raw[20:20 + struct.unpack_from("<Q", raw, 12)[0]])
    assert set(header) == {"format", "format_version", "kvcomp_version", "layout_version", "kind", "integrity",
                           "encryption"} and header["encryption"]["cipher"] == "AES-256-GCM"
    for word in (b'"sequences"', b'"seen"', b'"policy"', b'"geometry"'):
        assert word in plain and word not in raw
    again = saved(tmp_path, c, encrypt_key=KEY)
    assert json.loads(again[20:20 + struct.unpack_from("<Q", again, 12)[0]])["encryption"]["nonce"] != \
        header["encryption"]["nonce"]
    loaded = PagedKVCache.load(tmp_path / "c.kvc", encrypt_key=KEY)
    assert all(torch.equal(a, b) for a, b in zip(attend_all(c), attend_all(loaded)))


def test_encrypted_files_need_the_key(tmp_path):
    pytest.importorskip("cryptography")
    raw = saved(tmp_path, encrypt_key=KEY)
    with pytest.raises(KVCFileError, match="encrypted .AES-256-GCM.: load it with encrypt_key="):
        PagedKVCache.load(tmp_path / "c.kvc")
    with pytest.raises(KVCFileError, match="cannot decrypt"):
        PagedKVCache.load(tmp_path / "c.kvc", encrypt_key=OTHER)
    # the clear header is authenticated too: edit it (checksum recomputed) and decryption fails
    n = struct.unpack_from("<Q", raw, 12)[0]
    head = json.loads(raw[20:20 + n])
    head["kvcomp_version"] = "9.9.9"
    new = json.dumps(head, separators=(",", ":")).encode()
    body = struct.pack("<8sIQ", kvc_file.MAGIC, 2, len(new)) + new + raw[20 + n:-32]
    rejected(tmp_path, body + hashlib.sha256(body).digest(), "cannot decrypt", encrypt_key=KEY)
    saved(tmp_path)
    with pytest.raises(KVCFileError, match="not encrypted"):
        PagedKVCache.load(tmp_path / "c.kvc", encrypt_key=KEY)


def test_signed_and_encrypted(tmp_path):
    pytest.importorskip("cryptography")
    c = make()
    saved(tmp_path, c, key=KEY, encrypt_key=OTHER)
    loaded = PagedKVCache.load(tmp_path / "c.kvc", key=KEY, encrypt_key=OTHER)
    assert all(torch.equal(a, b) for a, b in zip(attend_all(c), attend_all(loaded)))
    for kw in (dict(key=KEY), dict(encrypt_key=OTHER), dict(key=OTHER, encrypt_key=OTHER)):
        with pytest.raises(KVCFileError):
            PagedKVCache.load(tmp_path / "c.kvc", **kw)


# ================================================================== HF
def hf_cache():
    from kvcomp.integrations.hf import KVCompCache
    cache = KVCompCache(policy=P.int8(hot_window=16), max_tokens=512)
    g = gen_from(3)
    for l in range(2):
        cache.update(heavy_tailed((2, H, 30, D), g, F32), heavy_tailed((2, H, 30, D), g, F32), l)
    return cache


def test_hf_keys(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("cryptography")
    from kvcomp.integrations.hf import KVCompCache
    cache = hf_cache()
    cache.save(tmp_path / "hf.kvc", key=KEY, encrypt_key=OTHER)
    back = KVCompCache.load(tmp_path / "hf.kvc", key=KEY, encrypt_key=OTHER)
    assert back.stats() == cache.stats() and back.load_report["validate_s"] >= 0
    q = torch.randn(2, 2 * H, D)
    for a, b in zip(cache.layers, back.layers):
        assert torch.equal(a.cache.attend(0, [0, 1], q), b.cache.attend(0, [0, 1], q))
    for kw, msg in ((dict(), "signed with a key"), (dict(key=KEY), "load it with encrypt_key="),
                    (dict(key=OTHER, encrypt_key=OTHER), "HMAC-SHA256 does not match")):
        with pytest.raises(KVCFileError, match=msg):
            KVCompCache.load(tmp_path / "hf.kvc", **kw)


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.update(max_tokens=0), r"max_tokens: 0 is not an int"),
    (lambda h: h.update(max_tokens=1000), r"layers\[0\].cache: must hold .* max_tokens"),
    (lambda h: h["layers"][0].update(native="yes"), r"layers\[0\]: native, pending_evict and compressed must be"),
    (lambda h: h["layers"][0].update(compressed=1), r"layers\[0\]: native, pending_evict and compressed must be"),
    (lambda h: h["layers"][0].update(batch_size=5), r"layers\[0\]"),
    (lambda h: h["layers"][1].update(batch_size=0), r"layers\[1\].cache: must be null"),
    (lambda h: h["layers"][0]["cache"]["policy"].update(hot_window=32), r"layers\[0\].cache: must hold"),
    (lambda h: h["layers"][0]["cache"]["geometry"].update(num_layers=2), r"geometry.num_layers"),
    (lambda h: h.update(layers={}), r"layers: must be a list"),
    (lambda h: h["layers"].append(2**63), r"layers\[2\]: must be a JSON object"),  # found by the fuzzer
])
def test_hf_header_fields(tmp_path, edit, match):
    pytest.importorskip("transformers")
    from kvcomp.integrations.hf import KVCompCache
    hf_cache().save(tmp_path / "hf.kvc")
    (tmp_path / "bad.kvc").write_bytes(edited((tmp_path / "hf.kvc").read_bytes(), header=edit))
    with pytest.raises(KVCFileError, match=match):
        KVCompCache.load(tmp_path / "bad.kvc")
    assert KVCompCache.load(tmp_path / "hf.kvc").max_tokens == 512


def test_header_nested_too_deep(tmp_path):
    raw = saved(tmp_path)
    _, t = split(raw)
    from safetensors.torch import save
    head, payload = b"[" * 100_000 + b"]" * 100_000, save(t)
    body = struct.pack("<8sIQ", kvc_file.MAGIC, 2, len(head)) + head + struct.pack("<Q", len(payload)) + payload
    rejected(tmp_path, body + hashlib.sha256(body).digest(), "not JSON")
