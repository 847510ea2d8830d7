"""kvc fuzz worker: builds a random cache from a case (a small dict drawn by
tests/test_kvc_fuzz.py), saves it to a ``.kvc`` file, mutates the file's
bytes and loads them. It runs in its own process, so a crash or hang fails
one example instead of the test run.

A case: the cache (``kind`` "paged" for PagedKVCache or "hf" for
KVCompCache, policy, dtype, geometry, sequences and what was done to them),
the file's protection (``mode``: plain, hmac, aes or hmac+aes; ``trailer``:
what a keyed file becomes after the change: its old trailer ("keep"), an
HMAC with a wrong key, a plain SHA-256, or "insider": re-signed and
re-encrypted with the right keys) and 1-3 mutations (name, parameter).
Mutations of the header JSON and of the safetensors payload are made on the
parsed structures and re-serialized; those of the framing on the bytes. An
unkeyed file gets a valid SHA-256 trailer again, so the contents are what
the reader has to check.

What must happen (anything else is a failure, returned as ``{"fail": ...,
"category": ...}``):
- The unmutated file loads into a cache equal to the source (positions,
  scores, bytes of the blocks in use, stats); a keyed file does so only with
  its keys (none, or a wrong one: KVCFileError), and an encrypted one holds
  none of the blocks' bytes and differs on every save (fresh nonce).
- The mutated file raises KVCFileError ("rejected") or loads ("loaded").
  Another exception from load is a failure. A keyed or encrypted file whose
  bytes changed must be rejected (but an insider's, checked as unkeyed).
- A loaded cache holds what a cache can hold: sequence ids str or int,
  0 <= positions < seen, unique per head and (but under H2O) the same in
  every head, block lists that fit the tier lengths and use each block
  once, tiers no longer than the policy holds, H2O scores finite and >= 0,
  every stored value finite and raw (fp16/bf16/fp32) ones within what the
  cache stores (and both tiers' formats).
  It attends (fixed random queries, every layer) to finite outputs, equal
  to the source's bit for bit where the file's content is unchanged; it
  saves and reloads to an equal cache; the three go on equally (appends,
  attends).

Protocol: length-prefixed pickles (tests/fuzz_pipe.py).
``PYTHONPATH=python python tests/kvc_fuzz_worker.py "<case dict>"`` runs one
case in-process.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import hmac
import json
import os
import random
import re
import struct
import sys
import tempfile
import traceback
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from safetensors.torch import load as st_load, save as st_save  # noqa: E402

import fuzz_pipe  # noqa: E402
from helpers import assert_same, gen_from, heavy_tailed  # noqa: E402
from kvcomp import CacheFullError, KVCFileError, KVFormat, PagedKVCache, policies as P  # noqa: E402

MEM_LIMIT = 3 << 30  # address space past torch's own: a file that makes us allocate too much fails cleanly
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RAW = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BOUNDARY = [-1, -7, 0, 2**31, 2**40, 2**63, 1.5, "x", None, [], {}, True]
NAMES = ["fp16", "bf16", "fp32", "int8", "nf4:h", "kivi2", "fp8_e4m3", "float16", "bfloat16", "float32",
         "h2o", "streaming", "on_reuse", "PagedKVCache", "hf.KVCompCache", "kvcomp.kvc"]
FRAME = struct.Struct("<8sIQ")  # magic, format version, header length (docs/format.md)
LENGTH = struct.Struct("<Q")
TRAILER = 32


# ------------------------------------------------------------------ policies
def _streaming(bs, wipe):
    return P.streaming_llm(sinks=2, window=bs + 24, hot_window=bs, block_size=bs, wipe=wipe)


POLICIES = {
    "full": lambda bs, w: P.full(block_size=bs, wipe=w),
    "int8": lambda bs, w: P.int8(block_size=bs, wipe=w),  # straight to the cold tier
    "int4": lambda bs, w: P.int4(hot_window=16, block_size=bs, wipe=w),
    "int3": lambda bs, w: P.int3(hot_window=16, block_size=bs, wipe=w),
    "int2": lambda bs, w: P.int2(hot_window=32, block_size=bs, wipe=w),
    "kivi2": lambda bs, w: P.kivi2(hot_window=32, block_size=bs, wipe=w),
    "fp8": lambda bs, w: P.fp8(block_size=bs, wipe=w),
    "fp8_e5m2_hot": lambda bs, w: P.fp8(cold_format="fp8_e5m2", hot_window=16, block_size=bs, wipe=w),
    "h2o": lambda bs, w: P.h2o(budget=32, hot_window=16, block_size=bs, wipe=w),
    "h2o_frac": lambda bs, w: P.h2o(budget=0.5, hot_window=16, evict_every=5, block_size=bs, wipe=w),
    "streaming_llm": _streaming,
    "combined": lambda bs, w: P.combined(budget=0.5, hot_window=16, block_size=bs, wipe=w),
    "h2o_window_pool": lambda bs, w: P.h2o(budget=0.5, hot_window=16, scorer="window", pool=5, block_size=bs, wipe=w),
}


def make_policy(c):
    return POLICIES[c["policy"]](c["bs"], c["wipe"])


class Failure(Exception):
    """A check failed; ``category`` groups failures of one kind."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category


# ------------------------------------------------------------------ the source
def _chunks(n, g):
    out = []
    while n > 0:
        m = min(n, [1, 5, 17, 40, n][int(torch.randint(5, (1,), generator=g))])
        out.append(m)
        n -= m
    return out


def _queries(cache, n, g):
    return torch.randn(n, cache.num_kv_heads * 2, cache.head_dim, generator=g).to(cache.dtype)


def build_paged(c, g):
    cache = PagedKVCache(c["layers"], c["heads"], c["head_dim"], make_policy(c), max_tokens=c["max_tokens"],
                         dtype=DTYPES[c["dtype"]], max_seqs=4)
    plan = []
    for sid, n in c["seqs"]:
        cache.add_sequence(sid)
        plan += [(sid, m) for m in _chunks(n, g)]
    random.Random(c["seed"]).shuffle(plan)  # the sequences' chunks interleaved
    attends = set(random.Random(c["seed"] + 1).sample(range(len(plan)), min(c["attends"], len(plan))))
    for i, (sid, m) in enumerate(plan):
        for l in range(cache.num_layers):
            k, v = (heavy_tailed((1, m, cache.num_kv_heads, cache.head_dim), g, cache.dtype) for _ in range(2))
            cache.append(l, [sid], k, v)
        if i in attends:
            for l in range(cache.num_layers):
                cache.attend(l, cache.sequences, _queries(cache, len(cache.sequences), g))
    if c["forget"] and cache.sequences:
        i, start, n = c["forget"]
        cache.forget(cache.sequences[i % len(cache.sequences)], start, start + n)
    return cache


def build_hf(c, g):
    from kvcomp.integrations.hf import KVCompCache
    cache = KVCompCache(policy=make_policy(c), max_tokens=c["max_tokens"])
    B, H, D, dtype = c["rows"], c["heads"], c["head_dim"], DTYPES[c["dtype"]]
    if not B:
        return cache
    for l in range(c["layers"]):
        if l == 0 and c["skip_layer0"] and c["layers"] > 1:
            continue  # a layer never run: no cache in the file
        k, v = (heavy_tailed((B, c["tokens"], H, D), g, dtype).transpose(1, 2) for _ in range(2))
        cache.update(k, v, l)
        cache.layers[l].awaiting_scores = False  # as after an attention call (these tests score by attend)
    live = [x for x in cache.layers if x.is_initialized]
    for step in range(c["decode"]):
        for l, layer in enumerate(cache.layers):
            if not layer.is_initialized:
                continue
            layer.native = True  # as after "kvcomp" attention: decode appends only (and H2O may evict)
            k, v = (heavy_tailed((B, 1, H, D), g, dtype).transpose(1, 2) for _ in range(2))
            cache.update(k, v, l)
            layer.awaiting_scores = False
            if step < c["attends"]:
                layer.cache.attend(0, list(range(B)), _queries(layer.cache, B, g))
    if c["forget"]:
        i, start, n = c["forget"]
        for layer in live:
            layer.cache.forget(i % B, start, start + n)
    return cache


def caches_of(obj) -> list:
    """The PagedKVCaches inside a loaded object (one per initialized HF layer)."""
    if isinstance(obj, PagedKVCache):
        return [obj]
    return [x.cache for x in obj.layers if x.is_initialized]


def assert_equal(a, b):
    """Two caches (PagedKVCache or KVCompCache) hold the same state."""
    if isinstance(a, PagedKVCache):
        assert isinstance(b, PagedKVCache)
        return assert_same(a, b)
    top = lambda x: (x.policy, x.max_tokens, len(x.layers))
    assert top(a) == top(b), f"policy/max_tokens/layers: {top(a)} vs {top(b)}"
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        assert x.is_initialized == y.is_initialized, f"layer {i}: initialized {x.is_initialized} vs {y.is_initialized}"
        if x.is_initialized:
            flags = lambda z: (z.batch_size, z.native, z.pending_evict, z.compressed)
            assert flags(x) == flags(y), f"layer {i}: batch_size/native/pending_evict/compressed differ"
            assert_same(x.cache, y.cache)


# ------------------------------------------------------------ invariants
def check_invariants(obj, what: str):
    """What any cache built through the API holds (the loader must not hand
    out less): see the module docstring."""
    if not isinstance(obj, PagedKVCache):
        for i, layer in enumerate(obj.layers):
            if not layer.is_initialized:
                continue
            if layer.cache.sequences != list(range(layer.batch_size)):
                raise Failure(f"{what}: HF layer rows", f"layer {i} holds {layer.cache.sequences}, "
                              f"batch_size {layer.batch_size}")
            if layer.cache.policy.replace(name=obj.policy.name) != obj.policy:  # the name is only a label
                raise Failure(f"{what}: HF layer policy",
                              f"layer {i}: {layer.cache.policy} vs the cache's {obj.policy}")
    for c in caches_of(obj):
        _check_cache(c, what)


def _check_cache(c: PagedKVCache, what: str):
    bs, H = c.policy.block_size, c.num_kv_heads
    used = {(name, l): [] for name in ("hot", "cold") for l in range(c.num_layers)}
    for s in c.sequences:
        if not isinstance(s, (str, int)):
            raise Failure(f"{what}: sequence id", f"{s!r} ({type(s).__name__}) is neither str nor int")
        for l, st in enumerate(c._seqs[s]):
            where = f"seq {s!r} layer {l}"
            if not isinstance(st.seen, int) or isinstance(st.seen, bool) or st.seen < 0:
                raise Failure(f"{what}: seen", f"{where}: seen={st.seen!r}")
            pos_all = []
            for name in ("hot", "cold"):
                t = getattr(st, name)
                if t.pos.dtype != torch.long or t.pos.dim() != 2 or t.pos.shape[0] != H:
                    raise Failure(f"{what}: positions tensor", f"{where} {name}: {t.pos.dtype} {tuple(t.pos.shape)}")
                if len(t.blocks) != -(-t.len // bs):
                    raise Failure(f"{what}: block list", f"{where} {name}: {len(t.blocks)} blocks for {t.len} tokens")
                used[(name, l)] += t.blocks
                pos_all.append(t.pos)
                if c.policy.eviction == "h2o":
                    if t.scores is None or tuple(t.scores.shape) != tuple(t.pos.shape) or \
                            not bool(torch.isfinite(t.scores).all()) or bool((t.scores < 0).any()):
                        raise Failure(f"{what}: scores", f"{where} {name}: {t.scores}")
                elif t.scores is not None:
                    raise Failure(f"{what}: scores", f"{where} {name}: scores without eviction='h2o'")
            if (not c._has_cold and st.cold.len) or (c._direct and st.hot.len) or \
                    (c._hot_cap is not None and st.hot.len > c._hot_cap) or \
                    (c.policy.eviction == "streaming" and st.cold.len > c._ring_cap):
                raise Failure(f"{what}: tier sizes", f"{where}: hot {st.hot.len}, cold {st.cold.len} tokens")
            pos = torch.cat(pos_all, 1)
            if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= st.seen):
                raise Failure(f"{what}: positions range", f"{where}: positions {int(pos.min())}..{int(pos.max())}, "
                              f"seen={st.seen}")
            for h in range(H):
                if pos[h].unique().numel() != pos.shape[1]:
                    raise Failure(f"{what}: positions unique", f"{where} head {h}: a position held twice")
            if c.policy.eviction != "h2o" and not bool((pos == pos[:1]).all()):  # only H2O evicts per head
                raise Failure(f"{what}: positions differ between heads", f"{where} ({c.policy.eviction} policy)")
            _check_values(c, st, l, where, what)
    for (name, l), ids in used.items():
        pool = (c.hot_pools if name == "hot" else c.cold_pools)[l]
        if len(set(ids)) != len(ids) or any(not 0 <= b < pool.shape[0] for b in ids):
            raise Failure(f"{what}: blocks", f"layer {l} {name}: block ids {sorted(ids)} (pool of {pool.shape[0]})")


def _check_values(c: PagedKVCache, st, l: int, where: str, what: str):
    """Every held value finite; raw sides within what the cache stores."""
    for name, pool, fmt in (("hot", c.hot_pools[l], c.hot_format), ("cold", c.cold_pools[l], c.cold_format)):
        t = getattr(st, name)
        if not t.len:
            continue
        k, v = c._read_blocks(pool, fmt, t.blocks, t.len)
        f = KVFormat.parse(fmt)
        for side, x, sf, top in (("K", k, f.k, c._storable_max[0]), ("V", v, f.v, c._storable_max[1])):
            if not bool(torch.isfinite(x).all()):
                raise Failure(f"{what}: stored values not finite", f"{where} {name} {side} ({fmt})")
            if sf.spec in RAW and bool((x.abs() > top).any()):
                raise Failure(f"{what}: raw values beyond the storable range",
                              f"{where} {name} {side} ({fmt}): max |x| {x.abs().max().item():g} > {top:g}")


# ------------------------------------------------------------ going on
def _attend(groups, g, what):
    """Each group: the same cache structure, twins; every output finite and
    the twins' equal bit for bit."""
    for i, twins in enumerate(zip(*groups)):
        c0 = twins[0]
        seqs = c0.sequences
        if not seqs:
            continue
        for l in range(c0.num_layers):
            q = _queries(c0, len(seqs), g)
            try:
                outs = [c.attend(l, seqs, q) for c in twins]
            except Exception as e:
                raise Failure(f"{what}: attend raised {type(e).__name__} at {_where(e)}", f"layer {l}: {e}") from None
            for o in outs:
                if not bool(torch.isfinite(o).all()):
                    raise Failure(f"{what}: attend not finite", f"cache {i} layer {l}: {o.flatten()[:4].tolist()} ...")
            for j, o in enumerate(outs[1:], 1):
                if not torch.equal(o, outs[0]):
                    raise Failure(f"{what}: attend differs between twins", f"cache {i} layer {l}, twin {j}")


def _append(groups, n, g, what):
    for twins in zip(*groups):
        c0 = twins[0]
        seqs = c0.sequences
        if not seqs:
            continue
        for l in range(c0.num_layers):
            k, v = (heavy_tailed((len(seqs), n, c0.num_kv_heads, c0.head_dim), g, c0.dtype) for _ in range(2))
            outcome = []
            for c in twins:
                try:
                    c.append(l, seqs, k, v)
                    outcome.append(None)
                except CacheFullError:
                    outcome.append("CacheFullError")  # a clean refusal, the cache unchanged
                except Exception as e:
                    raise Failure(f"{what}: append raised {type(e).__name__} at {_where(e)}",
                                  f"layer {l}: {e}") from None
            if len(set(outcome)) > 1:
                raise Failure(f"{what}: append differs between twins", f"layer {l}: {outcome}")


# ------------------------------------------------------------ the file
class Doc:
    """The file being mutated: its framing fields, header and payload, parsed
    where they parse (a framing this fuzzer does not know, an encrypted
    payload: raw bytes only). With ``encrypt_key`` (an insider, who holds
    the keys) an encrypted payload is decrypted: its body joins the header,
    its safetensors are the payload, and both are encrypted again, as
    docs/format.md says, when the file is put back together."""

    def __init__(self, data: bytes, encrypt_key=None):
        self.data, self.neutral = data, True
        self.framed = self.hdr = self.tensors = self.enc = None
        self.raw_header = self.raw_payload = False  # edited as bytes: the parsed structure is gone
        self.version = self.hlen = self.plen = None
        self.dump = dict(separators=(",", ":"))
        self.body_ops, self.file_ops = [], []
        if len(data) >= FRAME.size + LENGTH.size + TRAILER:
            magic, self.version, n = FRAME.unpack_from(data)
            at = FRAME.size + n
            if at + LENGTH.size <= len(data):
                m = LENGTH.unpack_from(data, at)[0]
                if at + LENGTH.size + m + TRAILER == len(data):
                    self.framed = True
                    self.magic, self.head = magic, data[FRAME.size:at]
                    self.payload = data[at + LENGTH.size:at + LENGTH.size + m]
        if self.framed:
            try:
                self.orig_hdr = json.loads(self.head)
            except ValueError:
                self.orig_hdr = None
            if encrypt_key is not None:
                self._decrypt(encrypt_key)
            try:
                self.orig_tensors = st_load(self.payload)
            except Exception:
                self.orig_tensors = None
        else:
            self.orig_hdr = self.orig_tensors = None

    def _decrypt(self, key):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        aead = AESGCM(key)
        nonce = bytes.fromhex(self.orig_hdr["encryption"]["nonce"])
        plain = aead.decrypt(nonce, self.payload, FRAME.pack(self.magic, self.version, len(self.head)) + self.head)
        n = LENGTH.unpack_from(plain)[0]
        self.inner, self.payload = plain[LENGTH.size:LENGTH.size + n], plain[LENGTH.size + n:]
        self.enc = (aead, nonce, list(self.orig_hdr))
        self.orig_hdr = {**self.orig_hdr, **json.loads(self.inner)}

    def _encrypt(self, prefix: bytes) -> bytes:
        aead, nonce, _ = self.enc
        plain = LENGTH.pack(len(self.inner)) + self.inner + self.payload
        try:  # with the nonce the header names now, if it names one AES-GCM takes
            return aead.encrypt(bytes.fromhex(json.loads(self.head)["encryption"]["nonce"]), plain,
                                prefix + self.head)
        except Exception:
            return aead.encrypt(nonce, plain, prefix + self.head)

    # lazily parsed copies for the structured mutations
    def header(self):
        if self.hdr is None and isinstance(self.orig_hdr, dict) and not self.raw_header:
            self.hdr = json.loads(json.dumps(self.orig_hdr))
        return self.hdr

    def payload_tensors(self):
        if self.tensors is None and self.orig_tensors is not None and not self.raw_payload:
            self.tensors = {k: v.clone() for k, v in self.orig_tensors.items()}
        return self.tensors

    def header_bytes(self) -> bytes:
        """The header as bytes, from now on edited as such."""
        self.serialize_header()
        self.hdr, self.raw_header = None, True
        return self.head

    def payload_bytes(self) -> bytes:
        self.serialize_payload()
        self.tensors, self.raw_payload = None, True
        return self.payload

    def serialize_header(self):
        if self.hdr is not None and self.enc:  # the clear keys stay clear, the others are encrypted
            clear = self.enc[2]
            self.head = json.dumps({k: v for k, v in self.hdr.items() if k in clear}, **self.dump).encode()
            self.inner = json.dumps({k: v for k, v in self.hdr.items() if k not in clear}, **self.dump).encode()
        elif self.hdr is not None:
            self.head = json.dumps(self.hdr, **self.dump).encode()

    def serialize_payload(self):
        if self.tensors is not None:
            self.payload = st_save({k: v.contiguous().clone() for k, v in self.tensors.items()})

    def body(self) -> bytes:
        if not self.framed:
            body = self.data[:-TRAILER]
        else:
            hlen = len(self.head) if self.hlen is None else self.hlen
            prefix = FRAME.pack(self.magic, self.version % 2**32, hlen % 2**64)
            payload = self._encrypt(prefix) if self.enc else self.payload
            plen = len(payload) if self.plen is None else self.plen
            body = prefix + self.head + LENGTH.pack(plen % 2**64) + payload
        for op in self.body_ops:
            body = op(body)
        return body

    # what the original header says about the blocks
    def entries(self) -> list:
        """(tensor name prefix, CACHE entry) of each cache the header describes."""
        h = self.orig_hdr if isinstance(self.orig_hdr, dict) else {}
        try:
            if h.get("kind") == "hf.KVCompCache":
                return [(f"layers.{i}.", e["cache"]) for i, e in enumerate(h["layers"]) if e.get("cache")]
            return [("", h["cache"])] if "cache" in h else []
        except (KeyError, TypeError, AttributeError):
            return []

    def blocks(self) -> list:
        """(tensor name, format, [(row, slot) used], block_size, head_dim) of each block tensor."""
        out = []
        for prefix, e in self.entries():
            try:
                bs, hd = e["policy"]["block_size"], e["geometry"]["head_dim"]
                for l in range(e["geometry"]["num_layers"]):
                    for name in ("hot", "cold"):
                        rows = []
                        for seq in e["sequences"]:
                            t = seq["layers"][l][name]
                            rows += [(t["blocks"][j // bs], j % bs) for j in range(t["len"])]
                        out.append((f"{prefix}{name}.{l}", e[f"{name}_format"], rows, bs, hd))
            except (KeyError, TypeError, IndexError):
                continue
        return out

    def columns(self, prefix: str) -> list:
        """(first column, count, seen) of each tier's positions, in file order."""
        out, col = [], 0
        for p, e in self.entries():
            if p != prefix:
                continue
            try:
                for seq in e["sequences"]:
                    for layer in seq["layers"]:
                        for name in ("hot", "cold"):
                            out.append((col, layer[name]["len"], layer["seen"]))
                            col += layer[name]["len"]
            except (KeyError, TypeError):
                return []
        return out


def _flip(data: bytes, rng, lo=0, hi=None, n=None) -> tuple[bytes, str]:
    hi = len(data) if hi is None else hi
    if hi <= lo:
        return data, "nothing to flip"
    b = bytearray(data)
    where = sorted(rng.randrange(lo, hi) for _ in range(n or rng.randint(1, 4)))
    for i in where:
        b[i] ^= rng.randint(1, 255)
    return bytes(b), f"bytes {where} flipped"


def _paths(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,)
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield path + (i,)
            yield from _paths(v, path + (i,))


def _pick_path(root, rng, want=lambda v: True):
    """A path, by pattern first (list indices as *), so every field gets its turn."""
    paths = [p for p in _paths(root) if want(_get(root, p))]
    if not paths:
        return None
    pattern = lambda p: tuple("*" if isinstance(x, int) else x for x in p)
    chosen = rng.choice(sorted({pattern(p) for p in paths}, key=repr))
    return rng.choice([p for p in paths if pattern(p) == chosen])


def _get(root, path):
    for k in path:
        root = root[k]
    return root


def _show(path) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


# -------------------------------------------------------------- mutations
# Each takes (doc, rng) and returns what it did; those needing a structure
# that does not parse (or is not there) fall back to raw byte flips.
def _mutation(needs=None, keeps_content=False, empty_ok=False):
    """A mutation; with ``needs`` "header" or "tensors" called as fn(doc,
    rng, the parsed header or tensors), and where that does not parse (or
    holds no tensors), raw byte flips instead; with "frame", flips where the
    framing does not parse. All but those that keep the content mark the
    file's content changed."""
    def wrap(fn):
        @functools.wraps(fn)
        def mutation(doc, rng):
            if needs == "frame" and not doc.framed:
                return _m_flip(doc, rng)
            if needs == "header" and doc.header() is None:
                return _no_header(doc, rng)
            if needs == "tensors" and (doc.payload_tensors() is None or not (doc.tensors or empty_ok)):
                return _no_tensors(doc, rng)
            if not keeps_content:
                doc.neutral = False
            if needs in (None, "frame"):
                return fn(doc, rng)
            return fn(doc, rng, doc.hdr if needs == "header" else doc.tensors)
        return mutation
    return wrap


@_mutation("frame")
def _no_header(doc, rng):
    doc.head, what = _flip(doc.header_bytes(), rng)
    return f"header not JSON (or edited as bytes): {what}"


def _m_header_field(how: str):
    """A header field (by path) set to a boundary value ("value"), or deleted."""
    @_mutation("header")
    def mutation(doc, rng, h):
        path = _pick_path(h, rng)
        if path is None:
            return _m_header_add(doc, rng)
        parent, key, old = _get(h, path[:-1]), path[-1], _get(h, path)
        if how == "delete":
            del parent[key]
            return f"header {_show(path)} deleted"
        options = list(BOUNDARY)
        if isinstance(old, int) and not isinstance(old, bool):
            options += [old - 1, old + 1, -old]
        if isinstance(old, str):
            options += NAMES
        new = rng.choice([o for o in options if repr(o) != repr(old)])
        parent[key] = json.loads(json.dumps(new))
        return f"header {_show(path)} = {new!r} (was {json.dumps(old)[:40]})"
    return mutation


_m_header_value, _m_header_delete = _m_header_field("value"), _m_header_field("delete")


@_mutation("header")
def _m_header_add(doc, rng, h):
    path = _pick_path(h, rng, lambda v: isinstance(v, (dict, list))) or ()
    node = _get(h, path)
    if isinstance(node, list) and node:
        node.append(json.loads(json.dumps(rng.choice(node))))
        return f"header {_show(path)}: an element repeated at the end"
    value = rng.choice(BOUNDARY + ["x"])
    if isinstance(node, list):
        node.append(value)
    else:
        node[rng.choice(["fuzz", "format_version", "encryption", "signed", "id"])] = value
    return f"header {_show(path) or '(top)'}: {value!r} added"


@_mutation("header")
def _m_swap_ids(doc, rng, h):
    lists = [_get(h, p) for p in _paths(h) if p[-1] == "sequences" and isinstance(_get(h, p), list)]
    lists = [x for x in lists if x and all(isinstance(s, dict) and "id" in s for s in x)]
    if not lists:
        return _m_header_value(doc, rng) + " (no sequences to swap)"
    seqs = rng.choice(lists)
    if len(seqs) >= 2:
        i, j = rng.sample(range(len(seqs)), 2)
        if rng.random() < 0.5:
            seqs[i]["id"], seqs[j]["id"] = seqs[j]["id"], seqs[i]["id"]
            return f"sequence ids {i} and {j} swapped"
        seqs[i]["id"] = seqs[j]["id"]
        return f"sequence {i} takes sequence {j}'s id {seqs[j]['id']!r}"
    new = rng.choice(["b", 9, -1, 2**63, 1.5, None, [], True])
    seqs[0]["id"] = new
    return f"the only sequence's id = {new!r}"


@_mutation("header", keeps_content=True)
def _m_header_respace(doc, rng, h):
    """The same header, spelled differently: content unchanged."""
    doc.dump = rng.choice([dict(indent=1), dict(separators=(", ", ": ")), dict(sort_keys=True),
                           dict(ensure_ascii=False, indent="\t")])
    return f"header re-serialized with {doc.dump}"


@_mutation("frame")
def _m_header_bytes(doc, rng):
    how = rng.randrange(3)
    if how == 0:
        doc.head, what = _flip(doc.head, rng)
        return f"header text: {what}"
    if how == 1:
        cut = rng.randrange(len(doc.head))
        doc.head = doc.head[:cut]
        return f"header text cut to {cut} bytes"
    bad = rng.choice([b"\xff\xfe", b"\xc3", b"\x00", b"\xed\xa0\x80"])
    at = rng.randrange(len(doc.head) + 1)
    doc.head = doc.head[:at] + bad + doc.head[at:]
    return f"header text: {bad!r} inserted at {at}"


@_mutation("frame")
def _no_tensors(doc, rng):
    if doc.tensors == {}:
        return _m_tensor_add(doc, rng) + " (no tensors)"
    doc.payload, what = _flip(doc.payload_bytes(), rng)
    return f"payload not safetensors (or edited as bytes): {what}"


@_mutation("tensors")
def _m_tensor_drop(doc, rng, t):
    name = rng.choice(sorted(t))
    del t[name]
    return f"tensor {name} dropped"


@_mutation("tensors")
def _m_tensor_rename(doc, rng, t):
    name = rng.choice(sorted(t))
    options = ["x", name + ".0", re.sub(r"\d+$", lambda m: str(int(m[0]) + 1), name),
               name.replace("hot", "cold") if "hot" in name else name.replace("cold", "hot"),
               re.sub(r"^layers\.(\d+)\.", lambda m: f"layers.{int(m[1]) + 1}.", name)] + sorted(t)
    new = rng.choice([o for o in options if o != name])
    if new in t:
        t[name], t[new] = t[new], t[name]
        return f"tensors {name} and {new} swapped"
    t[new] = t.pop(name)
    return f"tensor {name} renamed {new}"


@_mutation("tensors", empty_ok=True)
def _m_tensor_add(doc, rng, t):
    prefixes = sorted({re.sub(r"(hot|cold)\.\d+$|pos$|scores$", "", k) for k in t}) or [""]
    prefix = rng.choice(prefixes)
    pos = t.get(prefix + "pos", torch.zeros(1, 0, dtype=torch.long))
    blocks = [k for k in sorted(t) if re.search(r"(hot|cold)\.\d+$", k)]
    options = [("extra", torch.zeros(3)), (prefix + "scores", torch.zeros(pos.shape)),
               (prefix + "scores", torch.full(pos.shape, float("nan"))), ("layers.9.pos", pos.clone())]
    for k in blocks:
        layer = int(k.rsplit(".", 1)[1])
        options.append((re.sub(r"\d+$", str(layer + 1), k), t[k].clone()))
    name, value = rng.choice(options)
    t[name] = value
    return f"tensor {name} {str(value.dtype)[6:]} {tuple(value.shape)} added"


DTYPE_CHOICES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                 torch.float32, torch.float64, torch.bool]


@_mutation("tensors")
def _m_tensor_dtype(doc, rng, t):
    name = rng.choice(sorted(t))
    x = t[name]
    new = rng.choice([d for d in DTYPE_CHOICES if d != x.dtype])
    if new.itemsize == x.dtype.itemsize and new != torch.bool and x.dtype != torch.bool and rng.random() < 0.5:
        t[name] = x.view(new)
        how = "viewed as"
    else:
        t[name] = x.to(new)
        how = "converted to"
    return f"tensor {name} {str(x.dtype)[6:]} {how} {str(new)[6:]}"


@_mutation("tensors")
def _m_tensor_shape(doc, rng, t):
    name = rng.choice(sorted(t))
    x = t[name]
    ops = {
        "last row dropped": lambda x: x[:-1],
        "a zero row added": lambda x: torch.cat([x, torch.zeros_like(x[:1])]) if x.dim() else x[None],
        "row 0 repeated at the end": lambda x: torch.cat([x, x[:1]]) if x.dim() and len(x) else x,
        "last column dropped": lambda x: x[..., :-1] if x.dim() else x,
        "a column repeated": lambda x: torch.cat([x, x[..., -1:]], -1) if x.dim() else x,
        "transposed": lambda x: x.transpose(0, -1).contiguous() if x.dim() else x,
        "flattened": lambda x: x.flatten(),
        "unsqueezed": lambda x: x[None],
        "emptied": lambda x: x.flatten()[:0].reshape((0,) + tuple(x.shape[1:])) if x.dim() else x.flatten()[:0],
    }
    what = rng.choice(sorted(ops))
    t[name] = ops[what](x)
    return f"tensor {name} {tuple(x.shape)}: {what} -> {tuple(t[name].shape)}"


def _layout_side(fmt, hd, bs, rng, want):
    """A side (k or v) of fmt and its layout, among those ``want`` accepts."""
    f = KVFormat.parse(fmt)
    lay = f.layout(hd, bs)
    sides = [(s, getattr(f, s), lay[s]) for s in ("k", "v") if want(getattr(f, s), lay[s])]
    return rng.choice(sides) if sides else None


def _block_target(doc, rng, used=True):
    """A slot of a block tensor (in use by a tier if ``used``) and a KV head:
    name, fmt, row, slot, bs, hd, head, the tensor x and where (its description)."""
    t = doc.payload_tensors()
    blocks = [b for b in doc.blocks() if b[0] in t and t[b[0]].dim() == 3 and t[b[0]].shape[0] and t[b[0]].shape[1]
              and t[b[0]].dtype == torch.uint8 and t[b[0]].shape[2] == KVFormat.parse(b[1]).tile_bytes(b[4], b[3])]
    # (not one an earlier mutation reshaped or retyped)
    if used:
        blocks = [b for b in blocks if b[2]]
    if not blocks:
        return None
    name, fmt, rows, bs, hd = rng.choice(blocks)
    row, slot = rng.choice(rows) if rows and (used or rng.random() < 0.5) else \
        (rng.randrange(t[name].shape[0]), rng.randrange(bs))
    if row >= t[name].shape[0]:
        return None
    head = rng.randrange(t[name].shape[1])
    return SimpleNamespace(name=name, fmt=fmt, row=row, slot=slot, bs=bs, hd=hd, head=head, x=t[name],
                           where=f"tensor {name} ({fmt}) block row {row} slot {slot} head {head}")


@_mutation("tensors")
def _m_block_bytes(doc, rng, t):
    b = _block_target(doc, rng, used=rng.random() < 0.8)
    if b is None:
        return _m_tensor_shape(doc, rng) + " (no block in use)"
    where = sorted(rng.randrange(b.x.shape[2]) for _ in range(rng.randint(1, 4)))
    for i in where:
        b.x[b.row, b.head, i] ^= rng.randint(1, 255)
    return f"{b.where}: tile bytes {where} flipped"


def _special_values(dtype, rng):
    big = {torch.float32: [1e30, 3.4e38, 7e4, 1e5], torch.bfloat16: [1e30, 3.3e38, 7e4], torch.float16: [65504.0]}
    v = rng.choice([float("nan"), float("inf"), -float("inf")] + big[dtype] + [-x for x in big[dtype]])
    return v


@_mutation("tensors")
def _m_block_special(doc, rng, t):
    """NaN, Inf or a huge value written into a raw (fp16/bf16/fp32) element of
    a block in use; a quantized side gets a NaN/Inf code (fp8) or extreme codes."""
    b = _block_target(doc, rng, used=rng.random() < 0.9)
    if b is None:
        return _m_tensor_add(doc, rng) + " (no block in use)"
    side, sf, lay = _layout_side(b.fmt, b.hd, b.bs, rng, lambda sf, lay: sf.spec in RAW) or \
        _layout_side(b.fmt, b.hd, b.bs, rng, lambda sf, lay: True)
    row_at = lay["offset"] + b.slot * lay["row_bytes"]
    if sf.spec in RAW:
        dtype = RAW[sf.spec]
        elem, v = rng.randrange(b.hd), _special_values(dtype, rng)
        at = row_at + elem * dtype.itemsize
        b.x[b.row, b.head, at:at + dtype.itemsize] = torch.tensor([v], dtype=dtype).view(torch.uint8)
        return f"{b.where} {side}[{elem}] = {v!r}"
    code = rng.choice([0x7F, 0xFF, 0x7C, 0xFC, 0x80]) if sf.spec.startswith("fp8") else rng.choice([0x80, 0xFF, 0x7F])
    at = row_at + rng.randrange(lay["row_bytes"])
    b.x[b.row, b.head, at] = code
    return f"{b.where} {side} code byte {at} = {code:#x}"


FP16_WORDS = {"NaN": 0x7E00, "+Inf": 0x7C00, "-Inf": 0xFC00, "65504": 0x7BFF, "-65504": 0xFBFF, "-1": 0xBC00,
              "0": 0, "-0": 0x8000, "min subnormal": 1}


@_mutation("tensors")
def _m_scale_special(doc, rng, t):
    """A scale or zero (fp16 meta word) of a block in use set to NaN, Inf or an extreme."""
    b = _block_target(doc, rng)
    pick = b and _layout_side(b.fmt, b.hd, b.bs, rng, lambda sf, lay: lay["meta_bytes"] > 0)
    if not pick:
        return _m_block_special(doc, rng) + " (no scales there)"
    side, sf, lay = pick
    if sf.per_channel:
        word = rng.randrange(lay["meta_bytes"] // 2)
    else:
        per = lay["meta_bytes"] // b.bs // 2
        word = b.slot * per + rng.randrange(per)
    label = rng.choice(sorted(FP16_WORDS))
    at = lay["meta_offset"] + 2 * word
    b.x[b.row, b.head, at:at + 2] = torch.tensor(list(struct.pack("<H", FP16_WORDS[label])), dtype=torch.uint8)
    return f"{b.where} {side} meta word {word} = {label}"


@_mutation()
def _m_positions(doc, rng):
    t = doc.payload_tensors()
    names = [k for k in sorted(t or {}) if k.endswith("pos") and t[k].dim() == 2 and t[k].numel()
             and t[k].dtype == torch.long]  # not one an earlier mutation retyped
    if not names:
        return _no_tensors(doc, rng) if not t else _m_tensor_shape(doc, rng) + " (no positions)"
    name = rng.choice(names)
    x = t[name]
    tiers = [c for c in doc.columns(name[:-3]) if c[1] and c[0] + c[1] <= x.shape[1]]
    first, n, seen = rng.choice(tiers) if tiers else (0, x.shape[1], None)
    h, j = rng.randrange(x.shape[0]), first + rng.randrange(n)
    options = {"-1": -1, "-7": -7, "-2**63": -2**63, "2**62": 2**62, "2**31": 2**31}
    if seen is not None:
        options.update({"seen": seen, "seen + 5": seen + 5})
    if n > 1:
        other = first + rng.choice([i for i in range(n) if first + i != j])
        options["a duplicate of column %d" % other] = int(x[h, other])
        if rng.random() < 0.3:
            x[h, j], x[h, other] = int(x[h, other]), int(x[h, j])
            return f"tensor {name} head {h}: columns {j} and {other} swapped"
    label = rng.choice(sorted(options))
    x[h, j] = options[label]
    return f"tensor {name}[{h}, {j}] = {label} ({options[label]})"


@_mutation()
def _m_scores(doc, rng):
    t = doc.payload_tensors()
    names = [k for k in sorted(t or {}) if k.endswith("scores") and t[k].dim() == 2 and t[k].numel()
             and t[k].dtype == torch.float32]
    if not names:
        return _m_positions(doc, rng) + " (no scores)"
    name = rng.choice(names)
    x = t[name]
    v = rng.choice([float("nan"), -1.0, float("inf"), -float("inf"), 3e38, -0.0, -1e-30])
    if rng.random() < 0.2:
        x.fill_(v)
        where = "every entry"
    else:
        h, j = rng.randrange(x.shape[0]), rng.randrange(x.shape[1])
        x[h, j] = v
        where = f"[{h}, {j}]"
    return f"tensor {name} {where} = {v!r}"


@_mutation("frame")
def _m_payload_bytes(doc, rng):
    n = LENGTH.unpack_from(doc.payload)[0] + LENGTH.size if len(doc.payload) >= 8 else 0
    region = rng.choice(["safetensors header", "tensor data"]) if 0 < n < len(doc.payload) else "payload"
    lo, hi = {"safetensors header": (LENGTH.size, n), "tensor data": (n, len(doc.payload)),
              "payload": (0, len(doc.payload))}[region]
    doc.payload, what = _flip(doc.payload, rng, lo, hi)
    return f"payload {region}: {what}"


@_mutation(keeps_content=True)
def _m_st_header(doc, rng):
    """The safetensors header (its JSON) edited: a tensor's dtype, shape or offsets; or metadata added."""
    try:
        n = LENGTH.unpack_from(doc.payload)[0]
        meta = json.loads(doc.payload[8:8 + n])
        assert isinstance(meta, dict)
    except Exception:
        return _no_tensors(doc, rng)
    data = doc.payload[8 + n:]
    names = sorted(k for k in meta if k != "__metadata__")
    how = rng.randrange(4) if names else 3
    if how == 3:
        meta["__metadata__"] = {"fuzz": "x"}  # torch's load ignores it: the content is unchanged
        what = "metadata added"
    else:
        name = rng.choice(names)
        e = meta[name]
        doc.neutral = False
        if how == 0:
            e["dtype"] = rng.choice(["F64", "I8", "BOOL", "U64", "F8_E4M3", "X"])
            what = f"{name} dtype = {e['dtype']}"
        elif how == 1:
            e["shape"] = rng.choice([[2**62], [-1], [0], e["shape"] + [1], e["shape"][::-1], [2**32, 2**32]])
            what = f"{name} shape = {e['shape']}"
        else:
            a, b = e["data_offsets"]
            e["data_offsets"] = rng.choice([[b, a], [0, 2**63], [a, b + 1], [max(a - 1, 0), b], [0, 0]])
            what = f"{name} data_offsets = {e['data_offsets']}"
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    doc.payload = LENGTH.pack(len(text)) + text + data
    return f"safetensors header: {what}"


@_mutation("frame")
def _m_version(doc, rng):
    new = rng.choice([0, 2, 3, 2**31, 2**32 - 1, doc.version + 1, doc.version - 1])
    doc.version = new if new != doc.version else new + 1
    return f"format version field = {doc.version % 2**32}"


def _m_length(which: str):
    """The header's or the payload's length field set to a value at or past the right one."""
    @_mutation("frame")
    def mutation(doc, rng):
        right = len(doc.head if which == "header" else doc.payload)
        value = rng.choice([right - 1, right + 1, right + 8, right - 8, 0, len(doc.data), 2**63, 2**64 - 1,
                            2**32 + right])
        setattr(doc, "hlen" if which == "header" else "plen", value)
        return f"{which} length field = {value % 2**64}"
    return mutation


@_mutation()
def _m_truncate(doc, rng):
    if rng.random() < 0.5:
        frac = rng.random()
        doc.body_ops.append(lambda b: b[:int(len(b) * frac)])
        return f"body cut to {frac:.0%} (trailer redone)"
    cut = rng.choice([1, 8, 19, 20, 27, 28, 100, len(doc.data) // 2, len(doc.data) - 33, len(doc.data) - 1])
    doc.file_ops.append(lambda b: b[:cut])
    return f"file cut to {cut} bytes"


@_mutation()
def _m_append(doc, rng):
    extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 32, 64])))
    if rng.random() < 0.5:
        doc.body_ops.append(lambda b: b + extra)
        return f"{len(extra)} bytes appended before the trailer (trailer redone)"
    doc.file_ops.append(lambda b: b + extra)
    return f"{len(extra)} bytes appended after the trailer"


@_mutation()
def _m_flip(doc, rng):
    region = rng.choice(["prefix", "anywhere", "trailer"])
    seed = rng.random()
    if region == "trailer":
        doc.file_ops.append(lambda b: _flip(b, random.Random(seed), max(len(b) - TRAILER, 0))[0])
        return "trailer bytes flipped"
    hi = FRAME.size if region == "prefix" else None
    doc.body_ops.append(lambda b: _flip(b, random.Random(seed), 0, hi and min(hi, len(b)))[0])
    return f"{'prefix' if hi else 'body'} bytes flipped (trailer redone)"


# (stage, function): stage orders them: header JSON, tensors, raw header and
# payload bytes, framing fields, then byte-level edits of the whole file.
MUTATIONS = {
    "header_value": (0, _m_header_value), "header_delete": (0, _m_header_delete), "header_add": (0, _m_header_add),
    "swap_ids": (0, _m_swap_ids), "header_respace": (0, _m_header_respace),
    "tensor_drop": (1, _m_tensor_drop), "tensor_rename": (1, _m_tensor_rename), "tensor_add": (1, _m_tensor_add),
    "tensor_dtype": (1, _m_tensor_dtype), "tensor_shape": (1, _m_tensor_shape), "block_bytes": (1, _m_block_bytes),
    "block_special": (1, _m_block_special), "scale_special": (1, _m_scale_special), "positions": (1, _m_positions),
    "scores": (1, _m_scores),
    "header_bytes": (2, _m_header_bytes), "payload_bytes": (2, _m_payload_bytes), "st_header": (2, _m_st_header),
    "version": (3, _m_version), "header_len": (3, _m_length("header")), "payload_len": (3, _m_length("payload")),
    "truncate": (4, _m_truncate), "append": (4, _m_append), "flip": (4, _m_flip),
}


def mutate(data: bytes, c, keys) -> tuple[bytes, list, bool]:
    """(mutated bytes, what was done, whether only the spelling changed).
    Trailer "insider": re-signed (and re-encrypted) with the right keys."""
    insider = c["trailer"] == "insider"
    doc = Doc(data, keys["encrypt_key"] if insider and "aes" in c["mode"] else None)
    done = []
    order = sorted(range(len(c["muts"])), key=lambda i: MUTATIONS[c["muts"][i][0]][0])
    stage = 0
    for i in order:
        name, p = c["muts"][i]
        s, fn = MUTATIONS[name]
        if stage < 1 <= s:
            doc.serialize_header()
        if stage < 2 <= s:
            doc.serialize_payload()
        stage = s
        rng = random.Random(f"{c['seed']}:{i}:{p}")
        done.append(f"{name}: {fn(doc, rng)}")
    if stage < 1:
        doc.serialize_header()
    if stage < 2:
        doc.serialize_payload()
    body = doc.body()
    if insider and "hmac" in c["mode"]:
        trailer = hmac.new(keys["key"], body, hashlib.sha256).digest()
    elif c["mode"] == "plain" or c["trailer"] in ("sha256", "insider"):
        trailer = hashlib.sha256(body).digest()
    elif c["trailer"] == "wrong_hmac":
        trailer = hmac.new(keys["wrong_key"], body, hashlib.sha256).digest()
    else:  # keep the trailer as saved
        trailer = data[-TRAILER:]
    out = body + trailer
    for op in doc.file_ops:
        out = op(out)
    return out, done, doc.neutral


# ------------------------------------------------------------------ running
def _keys(c) -> dict:
    r = random.Random(c["seed"])
    k = lambda n: bytes(r.randrange(256) for _ in range(n))
    return {"key": k(32), "wrong_key": k(32), "encrypt_key": k(32), "wrong_encrypt_key": k(32)}


def _kwargs(c, keys, **override) -> dict:
    kw = {}
    if "hmac" in c["mode"]:
        kw["key"] = keys["key"]
    if "aes" in c["mode"]:
        kw["encrypt_key"] = keys["encrypt_key"]
    kw.update(override)
    return {k: v for k, v in kw.items() if v is not None}


def _load(c, path, kw, source):
    if c["cap"]:  # the caller's bound on what a file may make us allocate: the source's own
        kw = dict(kw, max_tokens=source.max_tokens)
    if c["kind"] == "paged":
        return PagedKVCache.load(path, **kw)
    from kvcomp.integrations.hf import KVCompCache
    return KVCompCache.load(path, **kw)


def _expect_rejected(c, path, kw, source, what):
    try:
        _load(c, path, kw, source)
    except KVCFileError:
        return
    except Exception as e:
        raise Failure(f"{what}: raised {type(e).__name__}, not KVCFileError", str(e)[:300]) from None
    raise Failure(f"{what}: loaded")


def _key_checks(c, keys, path, data, source, tmp):
    """The unmutated file with the wrong keys or none; an encrypted file's bytes."""
    if c["mode"] == "plain":
        if c["api_key"]:
            _expect_rejected(c, path, {"key": keys["key"]}, source, "an unsigned file loaded with a key")
        return
    _expect_rejected(c, path, {}, source, f"a {c['mode']} file loaded without its keys")
    if "hmac" in c["mode"]:
        _expect_rejected(c, path, _kwargs(c, keys, key=keys["wrong_key"]), source, "a signed file, wrong key")
    if "aes" in c["mode"]:
        _expect_rejected(c, path, _kwargs(c, keys, encrypt_key=keys["wrong_encrypt_key"]), source,
                         "an encrypted file, wrong encrypt_key")
    if c["mode"] == "hmac+aes":
        _expect_rejected(c, path, _kwargs(c, keys, key=None), source, "a signed file loaded without its key")
        _expect_rejected(c, path, _kwargs(c, keys, encrypt_key=None), source,
                         "an encrypted file loaded without its encrypt_key")
    if "aes" in c["mode"]:
        _encrypted_checks(c, keys, data, source, tmp)


def _encrypted_checks(c, keys, data, source, tmp):
    """No block's bytes (the first 16 of each tile) in the file; a fresh nonce every save."""
    for cache in caches_of(source):
        for s in cache.sequences:
            for l, st in enumerate(cache._seqs[s]):
                for name in ("hot", "cold"):
                    pool = (cache.hot_pools if name == "hot" else cache.cold_pools)[l]
                    for b in getattr(st, name).blocks:
                        for h in range(cache.num_kv_heads):
                            row = bytes(pool[b, h, :16].tolist())
                            if len(set(row)) >= 8 and row in data:  # (not a row of few byte values)
                                raise Failure("an encrypted file holds block bytes in the clear",
                                              f"seq {s!r} layer {l} {name} block {b} head {h}")
    again = os.path.join(tmp, "again.kvc")
    source.save(again, **_kwargs(c, keys))
    if open(again, "rb").read() == data:
        raise Failure("two encrypted saves of one cache are the same bytes (no fresh nonce)")


def _where(e: BaseException) -> str:
    """file:line where ``e`` was raised: failures from one line count together."""
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno}"


def _same(a, b, what):
    try:
        assert_equal(a, b)
    except AssertionError as e:
        raise Failure(f"{what} differs from the cache saved", str(e)[:300]) from None


def _reload(c, path, keys, source, like, what):
    """The cache of a file that must load and hold what ``like`` holds."""
    try:
        out = _load(c, path, _kwargs(c, keys), source)
    except Exception as e:
        raise Failure(f"{what} does not load: {type(e).__name__} at {_where(e)}", str(e)[:300]) from None
    _same(like, out, what)
    return out


def run_case(c: dict) -> dict:
    """Builds, saves, mutates, loads and checks one case. Returns
    {"outcome": "rejected" | "loaded", "message", "mutations", "changed"},
    or {"fail", "category", "mutations"}."""
    done, step = [], ["build"]
    try:
        with tempfile.TemporaryDirectory(prefix="kvc-fuzz-") as tmp:
            return _run(c, tmp, done, step)
    except Failure as e:
        return {"fail": str(e), "category": e.category, "mutations": done}
    except Exception as e:  # an unexpected exception in a step of the fuzzer's own (build, save, checks)
        return {"fail": traceback.format_exc(limit=-6), "category": f"{step[0]} raised {type(e).__name__} at "
                f"{_where(e)}", "mutations": done}


def _run(c, tmp, done, step):
    g = gen_from(c["seed"])
    source = (build_paged if c["kind"] == "paged" else build_hf)(c, g)
    check_invariants(source, "the source cache")
    keys = _keys(c)
    path = os.path.join(tmp, "c.kvc")
    step[0] = "save"
    source.save(path, **_kwargs(c, keys))
    data = open(path, "rb").read()
    _reload(c, path, keys, source, source, "the unmutated file")
    _key_checks(c, keys, path, data, source, tmp)

    step[0] = "mutate"
    bad, what, neutral = mutate(data, c, keys)
    done += what
    changed = bad != data
    with open(path, "wb") as f:
        f.write(bad)
    try:
        loaded = _load(c, path, _kwargs(c, keys), source)
    except KVCFileError as e:
        return {"outcome": "rejected", "message": str(e).replace(path + ": ", ""), "mutations": done,
                "changed": changed}
    except Exception as e:
        raise Failure(f"load raised {type(e).__name__} at {_where(e)}, not KVCFileError",
                      f"{str(e)[:300]}\n{traceback.format_exc(limit=-3)}") from None
    if changed and c["mode"] != "plain" and c["trailer"] != "insider":
        raise Failure(f"a changed {c['mode']} file loaded", f"trailer {c['trailer']}")
    step[0] = "checking the loaded cache"
    check_invariants(loaded, "the loaded cache")
    groups = [caches_of(loaded)]
    if not changed or neutral:
        _same(source, loaded, "the file's content is unchanged, but the loaded cache")
        groups.insert(0, caches_of(source))
    again = os.path.join(tmp, "again.kvc")
    try:
        loaded.save(again, **_kwargs(c, keys))
    except Exception as e:
        raise Failure(f"the loaded cache does not save: {type(e).__name__} at {_where(e)}", str(e)[:300]) from None
    reloaded = _reload(c, again, keys, source, loaded, "the loaded cache, saved again,")
    groups.append(caches_of(reloaded))
    gq = gen_from(c["seed"] + 7)
    _attend(groups, gq, "the loaded cache")
    _append(groups, random.Random(c["seed"]).choice([1, 3, c["bs"] + 1]), gq, "the loaded cache")
    _attend(groups, gq, "the loaded cache after an append")
    return {"outcome": "loaded", "message": "", "mutations": done, "changed": changed}


def serve():
    fuzz_pipe.serve(run_case, MEM_LIMIT, threads=1)


if __name__ == "__main__":
    if len(sys.argv) > 1:  # reproduce one case: python tests/kvc_fuzz_worker.py "{'kind': ...}"
        torch.set_num_threads(1)
        reply = run_case(ast.literal_eval(sys.argv[1]))
        print("\n".join(reply.pop("mutations", [])))
        print(reply.get("fail") or reply)
    else:
        serve()
