"""kvcomp-bench: the CLI runs, its JSON has the documented schema, and bad
arguments exit with code 2 and say why."""
import json
import math
import sys

import pytest
import torch

import kvcomp
from kvcomp import policies
from kvcomp.bench import cli, report

DECODE_KEYS = {"format", "batch", "context", "num_heads", "num_kv_heads", "head_dim", "block_size",
               "ms", "bytes", "gbps", "frac_of_read_bw", "frac_of_copy_bw", "gflops", "speedup_vs_dequant_sdpa"}
# A shape small enough for a few seconds on 2 cores.
TINY = ["--context", "256", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
        "--repeats", "2", "--warmup", "1", "--bandwidth-mib", "64", "--write-tokens", "64",
        "--topk-k", "32", "--no-flush", "--plain"]


def _positive_finite(row, keys):
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def _memory(tmp_path, *argv) -> dict:
    out = tmp_path / "m.json"
    assert cli.main(["memory", *argv, "--plain", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_memory_llama3_8b(tmp_path, capsys):
    # 20 GB keeps the h2o searches short (their footprint simulates every token).
    data = _memory(tmp_path, "--model", "llama-3-8b", "--gpu-memory", "20GB")
    assert "131072" in capsys.readouterr().out
    assert data["model"]["num_layers"] == 32 and data["model"]["num_kv_heads"] == 8
    assert data["seq_len"] == 32768 and data["hot_format"] == "fp16"
    rows = {r["format"]: r for r in data["formats"]}
    assert rows["fp16"]["bytes_per_token"] == 131072
    assert rows["fp16"]["bytes_per_token_at_seq_len"] == 131072
    assert rows["fp16"]["compression_vs_fp16"] == 1.0
    assert {"bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int2", "int2c/int2", "int4c/int4"} <= set(rows)
    for r in data["formats"]:
        _positive_finite(r, ["bytes_per_token", "compression_vs_fp16", "max_context"])
        assert r["max_context"] % data["block_size"] == 0 and isinstance(r["max_batch"], int)
    free = 20e9 - 8.03e9 * 2  # minus bf16 weights
    assert data["cache_bytes_available"] == pytest.approx(free)
    assert rows["fp16"]["max_context"] == free // (131072 * 16) * 16
    assert rows["fp16"]["max_batch"] == free // (131072 * 32768) == 0  # 4.3 GB a sequence
    assert rows["int2"]["max_batch"] == free // (24576 * 32768) == 4  # 96 B a token and head (16-bit scales)
    assert rows["int4"]["max_context"] > rows["int8"]["max_context"] > rows["fp16"]["max_context"]


def test_memory_policy_presets(tmp_path):
    data = _memory(tmp_path, "--model", "llama-3-8b", "--gpu-memory", "20GB")
    pols = {r["policy"]: r for r in data["policies"]}
    assert list(pols) == list(policies.PRESETS)
    fp16 = next(r for r in data["formats"] if r["format"] == "fp16")
    for key in ("bytes_per_token_at_seq_len", "compression_vs_fp16", "max_context", "max_batch"):
        assert pols["full"][key] == fp16[key], key
    model = cli.memory_bench.MODELS["llama-3-8b"]
    free = data["cache_bytes_available"]
    for name, row in pols.items():
        policy = policies.PRESETS[name]()
        assert row["bytes_per_token_at_seq_len"] == policy.bytes_per_token(32, 8, 128, 32768)
        assert row["max_batch"] == free // round(row["bytes_per_token_at_seq_len"] * 32768)
        if name == "streaming_llm":
            assert row["max_context"] is None and "constant memory" in row["note"]
            continue
        # max_context is the last block boundary that fits
        n, bs = row["max_context"], policy.block_size
        assert n % bs == 0 and row["note"] is None
        footprint = [policy.bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, m) * m
                     for m in (n, n + bs)]
        assert footprint[0] <= free < footprint[1], name
    # fewer bytes per token, longer context; equal bytes, equal context
    sized = sorted((r["bytes_per_token_at_seq_len"], r["max_context"]) for r in pols.values()
                   if r["max_context"] is not None)
    for (b0, c0), (b1, c1) in zip(sized, sized[1:]):
        assert c0 >= c1 if b0 < b1 else c0 == c1, (b0, c0, b1, c1)
    assert sized[0][1] > sized[-1][1]


def test_memory_full_equals_fp16_and_streaming_is_constant(tmp_path):
    streaming = {}
    for seq_len in (1, 100, 1000, 1024, 32768, 100003):
        data = _memory(tmp_path, "--model", "llama-3-8b", "--gpu-memory", "17GB", "--seq-len", str(seq_len))
        fp16 = next(r for r in data["formats"] if r["format"] == "fp16")
        pols = {r["policy"]: r for r in data["policies"]}
        assert pols["full"]["bytes_per_token_at_seq_len"] == fp16["bytes_per_token_at_seq_len"], seq_len
        streaming[seq_len] = pols["streaming_llm"]["bytes_per_token_at_seq_len"] * seq_len
    # sinks 4 + window 1020: 64 fp16 blocks per layer and KV head once past 1024 tokens
    assert {streaming[n] for n in (1024, 32768, 100003)} == {32 * 8 * 64 * 8192}
    assert streaming[100] < streaming[1024]


def test_memory_weights_do_not_fit(tmp_path, capsys):
    data = _memory(tmp_path, "--model", "llama-3-70b", "--gpu-memory", "80GB")
    assert "do not fit" in capsys.readouterr().err
    assert data["cache_bytes_available"] == 0
    for r in data["formats"] + data["policies"]:
        assert r["max_context"] == 0 and r["max_batch"] == 0


def test_memory_from_config_json(tmp_path):
    cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    data = _memory(tmp_path, "--model", str(tmp_path), "--formats", "fp16,int4", "--gpu-memory", "17GB")
    assert data["model"]["head_dim"] == 128
    assert data["model"]["params"] == pytest.approx(8.03e9, rel=0.01)  # Llama-3-8B's geometry
    assert data["formats"][0]["bytes_per_token"] == 131072
    assert len(data["policies"]) == len(policies.PRESETS)


def test_memory_hybrid_config_counts_sliding_layers_at_their_window(tmp_path):
    """A Gemma-3-like config: 5 of every 6 layers slide over 1,024 tokens."""
    pytest.importorskip("transformers")
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 4
    cfg = {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
           "num_hidden_layers": 24, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262144,
           "sliding_window": 1024, "layer_types": types}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    data = _memory(tmp_path, "--model", str(tmp_path), "--formats", "fp16,int8", "--seq-len", "32768")
    assert data["model"]["layer_types"] == types and data["model"]["sliding_window"] == 1024
    fp16, int8 = data["formats"]
    per_layer = 4 * kvcomp.KVFormat.parse("fp16").bytes_per_token(256, 16)  # 4 KV heads, padding included
    assert fp16["bytes_per_token_at_seq_len"] == pytest.approx(per_layer * (4 + 20 * 1024 / 32768))
    assert fp16["bytes_per_token"] == 4 * per_layer  # a token more costs the full-attention layers only
    rows = {r["policy"]: r for r in data["policies"]}
    want = policies.int8().bytes_per_token(24, 4, 256, 32768, layer_types=types, sliding_window=1024)
    assert rows["int8"]["bytes_per_token_at_seq_len"] == pytest.approx(want)
    assert rows["full"]["bytes_per_token_at_seq_len"] == pytest.approx(fp16["bytes_per_token_at_seq_len"])
    assert rows["int8"]["compression_vs_fp16"] > 1.8  # int8's ratio on every kind of layer


def test_policy_bytes_per_token_per_layer_type():
    types = ["sliding_attention", "full_attention", "linear_attention"]
    full = policies.full().bytes_per_token(3, 2, 64, 4096, torch.float16, layer_types=types, sliding_window=512)
    assert full == pytest.approx(2 * 2 * 64 * 2 * (1 + 512 / 4096))  # the linear layer holds nothing here
    with pytest.raises(ValueError, match="sliding_window"):
        policies.int8().bytes_per_token(3, 2, 64, 4096, layer_types=types)
    with pytest.raises(ValueError, match="3 entries for 2 layers"):
        policies.int8().bytes_per_token(2, 2, 64, 4096, layer_types=types, sliding_window=8)


def _run_ops(tmp_path, *argv) -> dict:
    out = tmp_path / "ops.json"
    assert cli.main(["ops", "--quick", "--json", str(out), *TINY, *argv]) == 0  # argv wins over TINY
    return json.loads(out.read_text())


def test_ops_quick_tiny_json(tmp_path):
    data = _run_ops(tmp_path, "--device", "cpu", "--formats", "int8,int4,kivi2")
    for key in ("device", "torch", "commit", "threads", "read_bandwidth_gbps", "config", "decode", "topk",
                "quantize_write", "seal_blocks", "baselines", "baselines_unavailable"):
        assert key in data, key
    assert isinstance(data["device"], str) and data["device"]
    assert data["commit"] is None or len(data["commit"]) == 40
    _positive_finite(data, ["threads", "read_bandwidth_gbps", "copy_bandwidth_gbps"])
    assert data["config"]["batches"] == [1] and data["config"]["contexts"] == [256]
    assert data["config"]["bandwidth_reference"] == "read"
    assert [b["name"] for b in data["baselines"]] == ["sdpa_fp32", "sdpa_bf16", "matmul_fp32"]
    for b in data["baselines"]:
        _positive_finite(b, ["ms", "bytes", "gbps", "frac_of_read_bw", "frac_of_copy_bw"])
        assert (b["batch"], b["context"]) == (1, 256)
    assert {(u["name"], u["reason"]) for u in data["baselines_unavailable"]} == {
        ("flash_attn_fp16", "CUDA only"), ("flashinfer_fp16", "CUDA only")}
    assert [r["format"] for r in data["decode"]] == ["int8", "int4", "int2c/int2"]
    speedups = {"speedup_vs_sdpa_fp32", "speedup_vs_sdpa_bf16", "speedup_vs_matmul_fp32"}
    for row in data["decode"]:
        assert DECODE_KEYS | speedups <= set(row)
        _positive_finite(row, DECODE_KEYS - {"format"} | speedups)
        assert (row["context"], row["num_heads"], row["num_kv_heads"], row["head_dim"]) == (256, 4, 2, 64)
        # Exactly the touched tiles: 256 / 16 blocks x 2 KV heads x tile bytes.
        tile = kvcomp.KVFormat.parse(row["format"]).tile_bytes(64, 16)
        assert row["bytes"] == 16 * 2 * tile
        assert row["gbps"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
        assert row["frac_of_read_bw"] == pytest.approx(row["gbps"] / data["read_bandwidth_gbps"])
        assert row["max_abs_err_vs_dequant_sdpa"] < 1e-3
    (topk,) = data["topk"]
    assert topk["k"] == 32 and topk["bytes"] == 2 * 256 * 4
    _positive_finite(topk, ["ms", "torch_topk_ms", "speedup_vs_torch_topk", "gbps", "frac_of_read_bw"])
    assert [r["format"] for r in data["quantize_write"]] == ["int8", "int4"]  # per-channel: sealed only
    assert [r["format"] for r in data["seal_blocks"]] == ["int8", "int4", "int2c/int2"]
    for row in data["quantize_write"] + data["seal_blocks"]:
        assert row["op"] in ("quantize_write", "seal_blocks") and row["tokens"] == 64
        _positive_finite(row, ["ms", "bytes", "bytes_read", "bytes_written", "gbps", "frac_of_copy_bw"])
        assert row["bytes"] == row["bytes_read"] + row["bytes_written"]
    for row in data["seal_blocks"]:
        assert row["op"] == "seal_blocks" and row["hot_format"] == "fp16"
        tile = kvcomp.KVFormat.parse(row["format"]).tile_bytes(64, 16)
        assert row["bytes_written"] == 64 // 16 * 2 * tile


def test_ops_batch_and_context_lists(tmp_path):
    # No --device: auto picks cuda when there is one.
    data = _run_ops(tmp_path, "--formats", "int4,kivi2", "--batch", "1,2", "--context", "128,256")
    assert data["device_type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    points = [(b, c) for b in (1, 2) for c in (128, 256)]
    assert [(r["batch"], r["context"], r["format"]) for r in data["decode"]] == [
        (b, c, f) for b, c in points for f in ("int4", "int2c/int2")]
    assert [(r["batch"], r["context"]) for r in data["topk"]] == points
    for row in data["decode"]:
        bases = [b for b in data["baselines"] if (b["batch"], b["context"]) == (row["batch"], row["context"])]
        assert len(bases) >= 3
        for b in bases:
            assert row[f"speedup_vs_{b['name']}"] == pytest.approx(b["ms"] / row["ms"])


def test_ops_plot(tmp_path):
    pytest.importorskip("matplotlib")  # an optional dependency (kvcomp[bench])
    png = tmp_path / "decode.png"
    data = _run_ops(tmp_path, "--device", "cpu", "--formats", "int4", "--context", "128,256", "--plot", str(png))
    assert data["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["ops", "--device", "cpu", "--quick", "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_cuda_tiny_json(tmp_path):
    data = _run_ops(tmp_path, "--device", "cuda")
    _positive_finite(data, ["read_bandwidth_gbps", "copy_bandwidth_gbps"])
    assert data["config"]["bandwidth_reference"] == "copy"
    for row in data["decode"]:
        _positive_finite(row, ["ms", "speedup_vs_sdpa_fp16", "speedup_vs_sdpa_bf16", "frac_of_copy_bw"])
    # FlashInfer and flash-attn: timed, or said why not
    timed = {b["name"] for b in data["baselines"]}
    missing = {u["name"] for u in data["baselines_unavailable"]}
    assert {"flash_attn_fp16", "flashinfer_fp16"} <= timed | missing


@pytest.mark.parametrize("argv", [
    ["bogus"],
    [],
    ["ops", "--head-dim", "100"],
    ["ops", "--block-size", "8"],
    ["ops", "--context", "0"],
    ["memory"],
    ["memory", "--model", "llama-3-8b", "--gpu-memory", "lots"],
    ["memory", "--model", "llama-3-8b", "--seq-len", "0"],
    ["ops", "--device", "tpu"],
    ["ops", "--batch", "0"],
    ["ops", "--context", "1024,x"],
    ["ops", "--context", ","],
])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_files_json(tmp_path):
    pytest.importorskip("cryptography")
    out = tmp_path / "f.json"
    argv = ["files", "--policies", "int4,kivi2", "--tokens", "300", "--layers", "1", "--kv-heads", "2",
            "--head-dim", "64", "--repeats", "1", "--plain", "--json", str(out)]
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    assert [(r["policy"], r["mode"]) for r in data["rows"]] == \
        [(p, m) for p in ("int4", "kivi2") for m in ("plain", "signed", "encrypted")]
    for r in data["rows"]:
        _positive_finite(r, ["file_mib", "save_s", "load_s", "read_s", "verify_s", "validate_s", "build_s"])
        assert 0 < r["validate_pct"] < 100


@pytest.mark.parametrize("argv, message", [
    (["memory", "--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["memory", "--model", "llama-3-8b", "--formats", "int9"], "bad format 'int9'"),
    (["ops", "--device", "cpu", "--formats", "int8,int9"], "bad format 'int9'"),
    (["ops", "--device", "cpu", "--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
    (["ops", "--device", "cpu", "--quick", "--sweep"], "exclude each other"),
    (["files", "--policies", "int4,int9"], "unknown policies ['int9']"),
])
def test_bad_values_return_2(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_ops_cuda_without_cuda_returns_2(capsys):
    assert cli.main(["ops", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_plain_table_without_rich(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    monkeypatch.setitem(sys.modules, "rich.console", None)
    report.print_table("t", [("name", "a", "{}"), ("value", "b", "{:.1f}")], [{"a": "x", "b": 2.0}, {"a": "yy"}])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "t" and lines[1].split() == ["name", "value"]
    assert lines[3].split() == ["x", "2.0"] and lines[4].split() == ["yy", "-"]


def test_json_rejects_non_finite(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        report.write_json(str(tmp_path / "x.json"), {"decode": [{"ms": float("nan")}]})
