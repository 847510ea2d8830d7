"""What ``kvcomp-bench accuracy`` compares kvcomp's policies with, on the same
prompts: llama.cpp's KV-cache types written as kvcomp formats, and
transformers' ``QuantizedCache`` with the quanto and HQQ backends (where
those packages install). Each comes with its bytes per token, so the report
compares at equal bytes."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from ..policy import Policy

# llama.cpp's q8_0 / q4_0: blocks of 32 values, one fp16 scale, symmetric
# (q4_0: the largest magnitude maps to -8), every token quantized on arrival;
# ":h" adds the Hadamard rotation llama.cpp now applies by default.
LLAMA_CPP = {
    "q8_0": "int8:g32", "q4_0": "int4:s", "q8_0:h": "int8:g32:h", "q4_0:h": "int4:s:h",
}


def llama_cpp_policy(name: str) -> Policy:
    return Policy(cold_format=LLAMA_CPP[name], hot_window=0, name=name)


@dataclass(frozen=True)
class QuantizedCachePeer:
    """transformers' QuantizedCache: its defaults (groups of 64 along the
    flattened tensor, a residual of up to 128 tokens in full precision)."""

    backend: str  # "quanto" or "hqq"
    nbits: int
    group: int = 64
    residual: int = 128

    @property
    def module(self) -> str:
        return {"quanto": "optimum.quanto", "hqq": "hqq"}[self.backend]

    @property
    def install(self) -> str:
        return {"quanto": "pip install optimum-quanto", "hqq": "pip install hqq"}[self.backend]

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:  # "optimum" itself missing
            return False

    def factory(self, config) -> Callable:
        from transformers import QuantizedCache
        return lambda: QuantizedCache(self.backend, config=config, nbits=self.nbits, q_group_size=self.group,
                                      residual_length=self.residual)

    def bits_per_element(self, seq_len: int) -> float:
        """All-in bits as if stored for an fp16 model: nbits plus an fp16 scale
        and zero per group, and on average half the residual in fp16 (the
        backends keep fp32 scales for an fp32 model; fp16 is what serving pays)."""
        hot = min(seq_len, self.residual // 2)
        cold = self.nbits + 2 * 16 / self.group
        return (cold * (seq_len - hot) + 16 * hot) / max(seq_len, 1)


PEERS = {f"{b}-int{n}": QuantizedCachePeer(b, n) for b in ("quanto", "hqq") for n in (4, 2)}
