"""The ``.kvc`` file: a cache saved to one self-describing file (docs/format.md,
"The .kvc file"):

    magic | format version | header length | header (JSON) | payload length | payload | trailer

The payload (safetensors) holds only the blocks in use, as they are
(compressed bytes, never dequantized), and the positions and heavy-hitter
scores; the header says whose blocks they are. The trailer is the SHA-256 of
every byte before it, or with ``key=`` their HMAC-SHA256. With
``encrypt_key=`` the payload is AES-256-GCM ciphertext of the header's body
and the tensors, and the header says only what the file is.

Loading checks the framing and trailer, decrypts, validates every field and
value (:mod:`kvcomp.kvc_validate`), and only then builds a fresh cache (new
pools, the blocks copied in and renumbered).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import struct
import time
from typing import Optional, Sequence

import torch
from safetensors.torch import load as _st_load, save as _st_save

from . import _native
from .cache import PagedKVCache
from .storage import LayerState
from .kvc_validate import Invalid, Plan, check_cache

FORMAT = "kvcomp.kvc"
FORMAT_VERSION = 2
READS = (1, 2)  # version 1: the same framing, always SHA-256, never encrypted
# PNG-style: a non-ASCII first byte, and CR LF / ^Z / LF expose text-mode copies.
MAGIC = b"\x89KVC\r\n\x1a\n"
_PREFIX = struct.Struct("<8sIQ")  # magic, format version, header length
_LENGTH = struct.Struct("<Q")     # payload length (and, encrypted, the body's length)
_DIGEST = 32                      # SHA-256 or HMAC-SHA256 of every byte before it
CIPHER = "AES-256-GCM"
_NONCE = 12                       # bytes; fresh and random per file
MIN_KEY = 16                      # bytes of an HMAC key
LOADERS = {"PagedKVCache": "kvcomp.PagedKVCache.load",
           "hf.KVCompCache": "kvcomp.integrations.hf.KVCompCache.load"}


class KVCFileError(ValueError):
    """A file that cannot be loaded as a ``.kvc`` cache: not a .kvc file,
    truncated, corrupted, another format version, another geometry than the
    one asked for, a field or value that does not validate, or a signature or
    encryption that does not match the keys given."""


def _key_arg(key, name: str, sizes: str):
    """bytes of a key argument (None stays None); TypeError/ValueError naming it."""
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes (e.g. secrets.token_bytes(32)), got {type(key).__name__}")
    key = bytes(key)
    if (len(key) != 32) if sizes == "exactly 32" else (len(key) < MIN_KEY):
        raise ValueError(f"{name} must be {sizes} bytes, got {len(key)}")
    return key


def _keys(key, encrypt_key) -> tuple:
    return (_key_arg(key, "key", f"at least {MIN_KEY}"), _key_arg(encrypt_key, "encrypt_key", "exactly 32"))


def _aesgcm(key: bytes):
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise ImportError("encrypt_key= needs the cryptography package: pip install 'kvcomp[crypto]'") from None
    return AESGCM(key)


def _trailer(parts, key: Optional[bytes]) -> bytes:
    digest = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


# ------------------------------------------------------------------ framing
def write(path, kind: str, body: dict, tensors: dict, key=None, encrypt_key=None) -> None:
    """Writes a .kvc file holding a ``kind`` (header ``body``, ``tensors``),
    signed with ``key`` and/or encrypted with ``encrypt_key`` when given."""
    from . import __version__
    key, encrypt_key = _keys(key, encrypt_key)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "kvcomp_version": __version__,
              "layout_version": int(_native.LAYOUT_VERSION), "kind": kind,
              "integrity": "hmac-sha256" if key is not None else "sha256"}
    payload = _st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    if encrypt_key is None:
        header.update(body)
    else:
        nonce = secrets.token_bytes(_NONCE)
        header["encryption"] = {"cipher": CIPHER, "nonce": nonce.hex()}
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head))
    if encrypt_key is not None:  # the clear header is authenticated data: it cannot be changed either
        inner = json.dumps(body, separators=(",", ":")).encode()
        payload = _aesgcm(encrypt_key).encrypt(nonce, _LENGTH.pack(len(inner)) + inner + payload, prefix + head)
    parts = [prefix, head, _LENGTH.pack(len(payload)), payload]
    _atomic_write(path, parts + [_trailer(parts, key)])


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


def read(path, kind: str, key=None, encrypt_key=None, report: Optional[dict] = None) -> tuple[dict, dict]:
    """Header (with its body, decrypted) and tensors of a .kvc file holding a
    ``kind``; KVCFileError for anything else. The whole file is checked
    (trailer, signature, decryption) before its contents are used. Seconds
    spent reading and checking go to ``report``."""
    key, encrypt_key = _keys(key, encrypt_key)
    where = os.fspath(path)
    bad = lambda msg: KVCFileError(f"{where}: {msg}")
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        data = f.read()
    t1 = time.perf_counter()
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
    if version not in READS:
        raise bad(f"format version {version} is not supported: this kvcomp reads versions {READS}")
    at = _PREFIX.size + head_len + _LENGTH.size  # the payload's offset
    size = at + _LENGTH.unpack_from(data, at - _LENGTH.size)[0] + _DIGEST if len(data) >= at else None
    view = memoryview(data)
    header = _loads(view[_PREFIX.size:_PREFIX.size + head_len])  # trusted only once the trailer checks out
    claimed = header.get("integrity", "sha256") if isinstance(header, dict) else None
    if key is not None:
        if not hmac.compare_digest(_trailer([view[:-_DIGEST]], key), data[-_DIGEST:]):
            if claimed == "sha256" and _trailer([view[:-_DIGEST]], None) == data[-_DIGEST:]:
                raise bad("not signed (saved without key=): a signed file was asked for, so it is rejected")
            raise bad("the HMAC-SHA256 does not match: the file was changed or truncated, or signed with "
                      "another key")
    elif claimed == "hmac-sha256":
        raise bad("signed with a key (HMAC-SHA256): load it with key=")
    elif hashlib.sha256(view[:-_DIGEST]).digest() != data[-_DIGEST:]:
        if size is None or len(data) < size:
            raise bad(f"truncated: {len(data)} bytes, its section lengths say {size or 'more'}")
        raise bad("corrupted: the SHA-256 of its contents differs from the one stored")
    if size != len(data):
        raise bad(f"corrupted: its section lengths add up to {size} bytes, the file has {len(data)}")
    header = _object(header, bad, "header")
    if header.get("format") != FORMAT:
        raise bad(f"the header does not name the format {FORMAT!r}")
    if header.get("integrity", "sha256") != ("hmac-sha256" if key is not None else "sha256") or \
            (version == 1 and ("integrity" in header or "encryption" in header)):
        raise bad(f"its header says integrity {header.get('integrity')!r}, which its trailer is not")
    if header.get("layout_version") != _native.LAYOUT_VERSION:
        raise bad(f"its blocks use pool layout version {header.get('layout_version')!r}, "
                  f"this kvcomp reads version {_native.LAYOUT_VERSION}")
    if header.get("kind") != kind:
        hint = LOADERS.get(header["kind"]) if isinstance(header.get("kind"), str) else None
        raise bad(f"it holds a {header.get('kind')!r}, not a {kind!r}" + (f" (load it with {hint})" if hint else ""))
    payload = view[at:size - _DIGEST]
    if "encryption" in header:
        header, payload = _decrypt(header, payload, view[:_PREFIX.size + head_len], encrypt_key, bad)
    elif encrypt_key is not None:
        raise bad("not encrypted: an encrypted file was asked for (encrypt_key=), so it is rejected")
    try:
        tensors = _st_load(payload.tobytes())
    except Exception as e:  # safetensors raises its own error types
        raise bad(f"corrupted: the payload is not safetensors ({e})") from None
    if report is not None:
        report.update(bytes=len(data), read_s=t1 - t0, verify_s=time.perf_counter() - t1)
    return header, tensors


_NOT_JSON = object()


def _loads(view: memoryview):
    """The JSON value of ``view``, or _NOT_JSON."""
    try:
        return json.loads(view.tobytes())
    except (ValueError, RecursionError):  # also UnicodeDecodeError; RecursionError: nested too deep
        return _NOT_JSON


def _object(value, bad, what: str) -> dict:
    """``value`` (from _loads) if a JSON object; KVCFileError otherwise."""
    if value is _NOT_JSON:
        raise bad(f"corrupted: the {what} is not JSON (or nested too deep)")
    if not isinstance(value, dict):
        raise bad(f"corrupted: the {what} is not a JSON object")
    return value


def _decrypt(header: dict, payload: memoryview, aad: memoryview, encrypt_key, bad) -> tuple[dict, memoryview]:
    """The header with its decrypted body, and the decrypted tensors' bytes."""
    enc = header["encryption"]
    if not isinstance(enc, dict) or enc.get("cipher") != CIPHER or not isinstance(enc.get("nonce"), str) \
            or len(enc["nonce"]) != 2 * _NONCE:
        raise bad(f"its header's encryption {enc!r} is not {CIPHER} with a {_NONCE}-byte nonce")
    if encrypt_key is None:
        raise bad(f"encrypted ({CIPHER}): load it with encrypt_key=")
    from cryptography.exceptions import InvalidTag
    try:
        plain = memoryview(_aesgcm(encrypt_key).decrypt(bytes.fromhex(enc["nonce"]), payload.tobytes(),
                                                        aad.tobytes()))
    except (InvalidTag, ValueError):
        raise bad("cannot decrypt it: encrypt_key is not the key it was encrypted with, or the file was "
                  "changed") from None
    n = _LENGTH.unpack_from(plain)[0] if len(plain) >= _LENGTH.size else len(plain)
    if _LENGTH.size + n > len(plain):
        raise bad("corrupted: the encrypted body's length exceeds the payload")
    body = _object(_loads(plain[_LENGTH.size:_LENGTH.size + n]), bad, "encrypted header")
    if set(body) & set(header):
        raise bad(f"the encrypted header repeats clear header keys {sorted(set(body) & set(header))}")
    return {**header, **body}, plain[_LENGTH.size + n:]


@contextlib.contextmanager
def malformed(path):
    """Turns a validation failure into KVCFileError naming the file."""
    try:
        yield
    except KVCFileError:
        raise
    except Invalid as e:
        raise KVCFileError(f"{os.fspath(path)}: {e}") from None


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


def build(plan: Plan, device) -> PagedKVCache:
    """The cache a validated plan describes: fresh pools holding just the
    stored blocks, copied in, the tiers renumbered."""
    cache = PagedKVCache(plan.num_layers, plan.num_kv_heads, plan.head_dim, plan.policy,
                         max_tokens=plan.max_tokens, dtype=plan.dtype, device=device, max_seqs=plan.max_seqs)
    new_ids = {}
    for name, allocs in (("hot", cache._hot_alloc), ("cold", cache._cold_alloc)):
        for l, (alloc, src) in enumerate(zip(allocs, plan.blocks[name])):
            new_ids[(name, l)] = ids = alloc.take(src.shape[0])  # the pool grows to hold them
            alloc.pool[torch.tensor(ids, dtype=torch.long, device=alloc.pool.device)] = src.to(alloc.pool.device)
    for seq_id, layers in plan.sequences:
        states = []
        for l, layer in enumerate(layers):
            st = LayerState(plan.num_kv_heads, cache._scores_device)
            st.seen = layer.seen
            for name in ("hot", "cold"):
                t, stored = getattr(st, name), getattr(layer, name)
                t.blocks = [new_ids[(name, l)][b] for b in stored.blocks]
                t.pos = plan.pos[:, stored.col:stored.col + stored.len].clone()
                if plan.scores is not None:
                    t.scores = plan.scores[:, stored.col:stored.col + stored.len].to(cache._scores_device, copy=True)
            states.append(st)
        cache._seqs[seq_id] = states
    return cache


def unused_tensors(tensors: dict, names: set, path) -> None:
    """KVCFileError if the payload holds tensors the header does not use."""
    extra = sorted(set(tensors) - names)
    if extra:
        raise KVCFileError(f"{os.fspath(path)}: the payload holds tensors the header does not use: {extra[:5]}")


def save_cache(cache: PagedKVCache, path, seq_ids: Optional[Sequence] = None, key=None, encrypt_key=None) -> None:
    entry, tensors = cache_entry(cache, seq_ids)
    write(path, "PagedKVCache", {"cache": entry}, tensors, key=key, encrypt_key=encrypt_key)


def load_cache(path, device, expect: dict, key=None, encrypt_key=None) -> PagedKVCache:
    report = {}
    header, tensors = read(path, "PagedKVCache", key, encrypt_key, report)
    t0 = time.perf_counter()
    with malformed(path):
        plan = check_cache(header.get("cache"), tensors, "", expect)
    unused_tensors(tensors, plan.names, path)
    t1 = time.perf_counter()
    cache = build(plan, device)
    cache.load_report = finish_report(report, t1 - t0, time.perf_counter() - t1)
    return cache


def finish_report(report: dict, validate_s: float, build_s: float) -> dict:
    """A load's timings: bytes, read_s, verify_s (trailer, decryption,
    payload parsing), validate_s, build_s, total_s and validate_fraction."""
    report.update(validate_s=validate_s, build_s=build_s)
    report["total_s"] = sum(report[k] for k in ("read_s", "verify_s", "validate_s", "build_s"))
    report["validate_fraction"] = validate_s / report["total_s"] if report["total_s"] else 0.0
    return report
