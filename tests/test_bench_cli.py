"""kvcomp-bench: the CLI runs, its JSON has the documented schema, and bad
arguments exit with code 2 and say why."""
import json
import math
import sys

import pytest
import torch

import kvcomp

from kvcomp.bench import cli, report

DECODE_KEYS = {"format", "batch", "context", "num_heads", "num_kv_heads", "head_dim", "block_size",
               "ms", "bytes", "gbps", "frac_of_read_bw", "gflops", "speedup_vs_dequant_sdpa"}
# A shape small enough for a few seconds on 2 cores.
TINY = ["--context", "256", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
        "--repeats", "2", "--warmup", "1", "--bandwidth-mib", "64", "--write-tokens", "64",
        "--topk-k", "32", "--no-flush", "--plain"]


def _positive_finite(row, keys):
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_memory_llama3_8b(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert cli.main(["memory", "--model", "llama-3-8b", "--plain", "--json", str(out)]) == 0
    assert "131072" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["model"]["num_layers"] == 32 and data["model"]["num_kv_heads"] == 8
    rows = {r["format"]: r for r in data["formats"]}
    assert rows["fp16"]["bytes_per_token"] == 131072
    assert rows["fp16"]["compression_vs_fp16"] == 1.0
    assert {"bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int2", "int2c/int2", "int4c/int4"} <= set(rows)
    for r in data["formats"]:
        _positive_finite(r, ["bytes_per_token", "compression_vs_fp16", "max_tokens"])
        assert r["max_tokens"] % data["block_size"] == 0
    # 80 GB minus 16.06 GB of bf16 weights, at 128 KiB a token.
    assert rows["fp16"]["max_tokens"] == (80e9 - 8.03e9 * 2) // (131072 * 16) * 16
    assert rows["int4"]["max_tokens"] > rows["int8"]["max_tokens"] > rows["fp16"]["max_tokens"]


def test_memory_from_config_json(tmp_path):
    cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.json"
    assert cli.main(["memory", "--model", str(tmp_path), "--formats", "fp16,int4",
                     "--plain", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"]["head_dim"] == 128
    assert data["model"]["params"] == pytest.approx(8.03e9, rel=0.01)  # Llama-3-8B's geometry
    assert data["formats"][0]["bytes_per_token"] == 131072


def test_ops_quick_tiny_json(tmp_path):
    out = tmp_path / "ops.json"
    rc = cli.main(["ops", "--device", "cpu", "--quick", "--formats", "int8,int4,kivi2",
                   "--json", str(out), *TINY])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("device", "torch", "commit", "threads", "read_bandwidth_gbps", "decode", "topk",
                "quantize_write", "baselines"):
        assert key in data, key
    assert isinstance(data["device"], str) and data["device"]
    assert data["commit"] is None or len(data["commit"]) == 40
    _positive_finite(data, ["threads", "read_bandwidth_gbps", "copy_bandwidth_gbps"])
    assert [b["name"] for b in data["baselines"]] == ["sdpa_fp32", "sdpa_bf16", "matmul_fp32"]
    assert [r["format"] for r in data["decode"]] == ["int8", "int4", "int2c/int2"]
    speedups = {"speedup_vs_sdpa_fp32", "speedup_vs_sdpa_bf16", "speedup_vs_matmul_fp32"}
    for row in data["decode"]:
        assert DECODE_KEYS | speedups <= set(row)
        _positive_finite(row, DECODE_KEYS - {"format"} | speedups)
        assert (row["context"], row["num_heads"], row["num_kv_heads"], row["head_dim"]) == (256, 4, 2, 64)
        # Exactly the touched tiles: 256 / 16 blocks x 2 KV heads x tile bytes.
        tile = kvcomp.KVFormat.parse(row["format"]).tile_bytes(64, 16)
        assert row["bytes"] == 16 * 2 * tile
        assert row["max_abs_err_vs_dequant_sdpa"] < 1e-3
    (topk,) = data["topk"]
    assert topk["k"] == 32
    _positive_finite(topk, ["ms", "torch_topk_ms", "speedup_vs_torch_topk"])
    ops_by_fmt = {r["format"]: r["op"] for r in data["quantize_write"]}
    assert ops_by_fmt == {"int8": "quantize_write", "int4": "quantize_write", "int2c/int2": "seal_blocks"}
    for row in data["quantize_write"]:
        _positive_finite(row, ["tokens", "ms", "bytes", "gbps"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_cuda_tiny_json(tmp_path):
    out = tmp_path / "ops.json"
    assert cli.main(["ops", "--device", "cuda", "--quick", "--json", str(out), *TINY]) == 0
    data = json.loads(out.read_text())
    _positive_finite(data, ["read_bandwidth_gbps", "copy_bandwidth_gbps"])
    for row in data["decode"]:
        _positive_finite(row, ["ms", "speedup_vs_sdpa_fp16", "speedup_vs_sdpa_bf16", "frac_of_copy_bw"])


@pytest.mark.parametrize("argv", [
    ["bogus"],
    [],
    ["ops", "--head-dim", "100"],
    ["ops", "--block-size", "8"],
    ["ops", "--context", "0"],
    ["memory"],
    ["memory", "--model", "llama-3-8b", "--gpu-memory", "lots"],
])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["memory", "--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["memory", "--model", "llama-3-8b", "--formats", "int9"], "bad format 'int9'"),
    (["ops", "--device", "cpu", "--formats", "int8,int9"], "bad format 'int9'"),
    (["ops", "--device", "cpu", "--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
])
def test_bad_values_return_2(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


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
