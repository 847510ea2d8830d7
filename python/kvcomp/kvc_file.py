"""The ``.kvc`` file: a cache saved to one self-describing file (docs/format.md,
"The .kvc file"):

    magic | format version | header length | header (JSON) | payload length | payload (safetensors) | SHA-256

The payload holds only the blocks in use, as they are (compressed bytes, never
dequantized), and the positions and heavy-hitter scores; the header says whose
blocks they are. Loading builds a fresh cache (new pools, the blocks copied in
and renumbered) and hands it out only once everything checked out.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import struct
from typing import Optional, Sequence

import torch
from safetensors.torch import load as _st_load, save as _st_save

from . import _C
from .cache import PagedKVCache, _Layer
from .policy import Policy

FORMAT = "kvcomp.kvc"
FORMAT_VERSION = 1
# PNG-style: a non-ASCII first byte, and CR LF / ^Z / LF expose text-mode copies.
MAGIC = b"\x89KVC\r\n\x1a\n"
_PREFIX = struct.Struct("<8sIQ")  # magic, format version, header length
_LENGTH = struct.Struct("<Q")     # payload length
_DIGEST = 32                      # SHA-256 of every byte before it
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LOADERS = {"PagedKVCache": "kvcomp.PagedKVCache.load",
           "hf.KVCompCache": "kvcomp.integrations.hf.KVCompCache.load"}


class KVCFileError(ValueError):
    """A file that cannot be loaded as a ``.kvc`` cache: not a .kvc file,
    truncated, corrupted, another format version, or another geometry than
    the one asked for."""


# ------------------------------------------------------------------ framing
def write(path, kind: str, body: dict, tensors: dict) -> None:
    """Writes a .kvc file holding a ``kind`` (header ``body``, ``tensors``)."""
    from . import __version__
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "kvcomp_version": __version__,
              "layout_version": int(_C.LAYOUT_VERSION), "kind": kind, **body}
    head = json.dumps(header, separators=(",", ":")).encode()
    payload = _st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head, _LENGTH.pack(len(payload)), payload]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    _atomic_write(path, parts + [digest.digest()])


def _atomic_write(path, parts: list) -> None:
    """A temporary file in the same folder, fsynced, renamed over ``path``,
    then the folder fsynced: a crash leaves the old file (or none), never a
    partial one, and no temporary file once the exception is through."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
    # os.open, not mkstemp: the file gets the umask's permissions, not 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        os.unlink(tmp)
        raise
    if os.name == "posix":  # the rename is durable once the folder is; Windows cannot open folders
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read(path, kind: str) -> tuple[dict, dict]:
    """Header and tensors of a .kvc file holding a ``kind``; KVCFileError for
    anything else. The whole file is checked before its contents are used."""
    where = os.fspath(path)
    bad = lambda msg: KVCFileError(f"{where}: {msg}")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise bad("the file is empty, not a .kvc file")
    if data[:len(MAGIC)] != MAGIC:
        if MAGIC.startswith(data):
            raise bad(f"truncated: {len(data)} bytes, not even the magic")
        if data[8:9] == b"{":
            raise bad("a plain safetensors file, not a .kvc file (written by PagedKVCache.save)")
        raise bad(f"not a .kvc file: it starts with {data[:8]!r}, a .kvc file with {MAGIC!r}")
    if len(data) < _PREFIX.size:
        raise bad(f"truncated: {len(data)} bytes, less than the {_PREFIX.size}-byte prefix")
    _, version, head_len = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise bad(f"format version {version} is not supported: this kvcomp reads version {FORMAT_VERSION}")
    at = _PREFIX.size + head_len + _LENGTH.size  # the payload's offset
    size = at + _LENGTH.unpack_from(data, at - _LENGTH.size)[0] + _DIGEST if len(data) >= at else None
    view = memoryview(data)
    if hashlib.sha256(view[:-_DIGEST]).digest() != data[-_DIGEST:]:
        if size is None or len(data) < size:
            raise bad(f"truncated: {len(data)} bytes, its section lengths say {size or 'more'}")
        raise bad("corrupted: the SHA-256 of its contents differs from the one stored")
    if size != len(data):
        raise bad(f"corrupted: its section lengths add up to {size} bytes, the file has {len(data)}")
    try:
        header = json.loads(view[_PREFIX.size:_PREFIX.size + head_len].tobytes())
    except ValueError:  # also UnicodeDecodeError
        raise bad("corrupted: the header is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise bad(f"the header does not name the format {FORMAT!r}")
    if header.get("layout_version") != _C.LAYOUT_VERSION:
        raise bad(f"its blocks use pool layout version {header.get('layout_version')!r}, "
                  f"this kvcomp reads version {_C.LAYOUT_VERSION}")
    if header.get("kind") != kind:
        hint = LOADERS.get(header.get("kind"))
        raise bad(f"it holds a {header.get('kind')!r}, not a {kind!r}" + (f" (load it with {hint})" if hint else ""))
    try:
        tensors = _st_load(view[at:size - _DIGEST].tobytes())
    except Exception as e:  # safetensors raises its own error types
        raise bad(f"corrupted: the payload is not safetensors ({e})") from None
    return header, tensors


@contextlib.contextmanager
def malformed(path):
    """Turns what a header or tensors of the wrong shape raise into KVCFileError."""
    try:
        yield
    except KVCFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise KVCFileError(f"{os.fspath(path)}: inconsistent header or tensors ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------- PagedKVCache
def cache_entry(cache: PagedKVCache, seq_ids: Optional[Sequence] = None, prefix: str = "") -> tuple[dict, dict]:
    """The header entry and tensors (names starting with ``prefix``) of
    ``cache``'s sequences ``seq_ids`` (all by default)."""
    seq_ids = cache.sequences if seq_ids is None else list(seq_ids)
    for s in seq_ids:
        cache._known(s)
        if not isinstance(s, (str, int)):
            raise ValueError(f"seq_ids: a saved sequence id must be a str or an int, got {s!r}")
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError(f"seq_ids has duplicates: {seq_ids}")
    L, H = cache.num_layers, cache.num_kv_heads
    used = {name: [[] for _ in range(L)] for name in ("hot", "cold")}  # pool block ids in file order
    pos, scores, seqs = [], [], []
    for s in seq_ids:
        layers = []
        for l, st in enumerate(cache._seqs[s]):
            entry = {"seen": st.seen}
            for name in ("hot", "cold"):
                t, ids = getattr(st, name), used[name][l]
                entry[name] = {"len": t.len, "blocks": list(range(len(ids), len(ids) + len(t.blocks)))}
                ids += t.blocks
                pos.append(t.pos)
                if t.scores is not None:
                    scores.append(t.scores.cpu())
            layers.append(entry)
        seqs.append({"id": s, "layers": layers})
    tensors = {f"{prefix}pos": torch.cat(pos, 1) if pos else torch.empty(H, 0, dtype=torch.long)}
    if cache.policy.eviction == "h2o":
        tensors[f"{prefix}scores"] = torch.cat(scores, 1) if scores else torch.empty(H, 0)
    for name, pools in (("hot", cache.hot_pools), ("cold", cache.cold_pools)):
        for l, pool in enumerate(pools):
            tensors[f"{prefix}{name}.{l}"] = pool[torch.tensor(used[name][l], dtype=torch.long, device=pool.device)]
    entry = {
        "geometry": {"num_layers": L, "num_kv_heads": H, "head_dim": cache.head_dim,
                     "dtype": str(cache.dtype).removeprefix("torch.")},
        "policy": dataclasses.asdict(cache.policy),
        "max_tokens": cache.max_tokens, "max_seqs": cache.max_seqs,
        "hot_format": cache.hot_format, "cold_format": cache.cold_format,
        "sequences": seqs,
    }
    return entry, tensors


def cache_from(entry: dict, tensors: dict, prefix: str, device, path, expect: Optional[dict] = None
               ) -> PagedKVCache:
    """A new PagedKVCache on ``device`` from :func:`cache_entry`'s output;
    KVCFileError where ``expect`` (num_layers, ..., dtype; None: any) differs."""
    bad = lambda msg: KVCFileError(f"{os.fspath(path)}: {msg}")
    g = entry["geometry"]
    dtype = DTYPES[g["dtype"]]
    for k, want in (expect or {}).items():
        got = dtype if k == "dtype" else g[k]
        if want is not None and got != want:
            raise bad(f"the cache was saved with {k}={got}, expected {k}={want}")
    cache = PagedKVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"], Policy(**entry["policy"]),
                         max_tokens=entry["max_tokens"], dtype=dtype, device=device, max_seqs=entry["max_seqs"])
    if (cache.hot_format, cache.cold_format) != (entry["hot_format"], entry["cold_format"]):
        raise bad(f"the policy gives formats {cache.hot_format}/{cache.cold_format}, "
                  f"the blocks are {entry['hot_format']}/{entry['cold_format']}")
    L, H, bs = cache.num_layers, cache.num_kv_heads, cache.policy.block_size
    new_ids = {}
    for name, pools, allocs in (("hot", cache.hot_pools, cache._hot_alloc), ("cold", cache.cold_pools,
                                                                              cache._cold_alloc)):
        for l, (pool, alloc) in enumerate(zip(pools, allocs)):
            key = f"{prefix}{name}.{l}"
            src = tensors[key]
            if src.dtype != torch.uint8 or tuple(src.shape[1:]) != tuple(pool.shape[1:]):
                raise bad(f"tensor {key} is {src.dtype} {tuple(src.shape)}, the {name} pool's blocks are "
                          f"uint8 {tuple(pool.shape[1:])}")
            if src.shape[0] > len(alloc.free_ids):
                raise bad(f"tensor {key} holds {src.shape[0]} blocks, the {name} pool has {pool.shape[0]}")
            new_ids[(name, l)] = alloc.take(src.shape[0])
            pool[torch.tensor(new_ids[(name, l)], dtype=torch.long, device=pool.device)] = src.to(pool.device)
    pos, scores = tensors[f"{prefix}pos"], tensors.get(f"{prefix}scores")
    if pos.dtype != torch.long or pos.dim() != 2 or pos.shape[0] != H:
        raise bad(f"tensor {prefix}pos is {pos.dtype} {tuple(pos.shape)}, not int64 [{H}, tokens]")
    if (scores is not None) != (cache.policy.eviction == "h2o") or \
            (scores is not None and (scores.dtype != torch.float32 or scores.shape != pos.shape)):
        raise bad(f"tensor {prefix}scores must be float32 {tuple(pos.shape)} exactly when eviction='h2o'")
    col, refs = 0, {k: [] for k in new_ids}
    for seq in entry["sequences"]:
        if seq["id"] in cache._seqs or len(seq["layers"]) != L:
            raise bad(f"sequence {seq['id']!r} is listed twice or has not {L} layers")
        layers = []
        for l, e in enumerate(seq["layers"]):
            st = _Layer(H, cache._scores_device)
            st.seen = e["seen"]
            for name in ("hot", "cold"):
                t, n, blocks = getattr(st, name), e[name]["len"], e[name]["blocks"]
                if len(blocks) != -(-n // bs) or col + n > pos.shape[1]:
                    raise bad(f"sequence {seq['id']!r} layer {l}: {name} tier of {n} tokens has "
                              f"{len(blocks)} blocks of {bs}, or its positions are missing")
                refs[(name, l)] += blocks
                t.blocks = [new_ids[(name, l)][b] for b in blocks]
                t.pos = pos[:, col:col + n].clone()
                if scores is not None:
                    t.scores = scores[:, col:col + n].to(cache._scores_device, copy=True)
                col += n
            layers.append(st)
        cache._seqs[seq["id"]] = layers
    if col != pos.shape[1]:
        raise bad(f"tensor {prefix}pos has {pos.shape[1]} columns, the tiers hold {col} tokens")
    for (name, l), ids in refs.items():
        if sorted(ids) != list(range(len(new_ids[(name, l)]))):
            raise bad(f"layer {l}: the {name} tiers do not use each stored block exactly once")
    return cache


def save_cache(cache: PagedKVCache, path, seq_ids: Optional[Sequence] = None) -> None:
    entry, tensors = cache_entry(cache, seq_ids)
    write(path, "PagedKVCache", {"cache": entry}, tensors)


def load_cache(path, device, expect: dict) -> PagedKVCache:
    header, tensors = read(path, "PagedKVCache")
    with malformed(path):
        return cache_from(header["cache"], tensors, "", device, path, expect)
