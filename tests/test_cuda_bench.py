"""``kvcomp-bench ops --sweep`` (the GPU benchmark of bench/device_check.sh):
the JSON has the schema the CUDA issue asks for. A tiny grid runs on the CPU
in every test run (so the sweep's code stays working without a GPU), and on
CUDA under ``-m cuda``; the bar table is checked on synthetic rows."""
import json
import math

import pytest
import torch

from kvcomp.bench import cli, plots, report

TINY_SWEEP = ["--sweep", "--batch", "1,2", "--context", "256,272", "--topk-contexts", "512",
              "--topk-k", "32", "--formats", "fp16,int4,kivi2", "--heads", "4", "--kv-heads", "2",
              "--head-dim", "64", "--repeats", "2", "--warmup", "1", "--bandwidth-mib", "64",
              "--write-tokens", "128", "--no-flush", "--plain"]
TOP_KEYS = {"device", "torch", "commit", "copy_bandwidth_gbps", "decode", "sdpa", "baselines",
            "baselines_unavailable", "skipped", "quantize_write", "seal_blocks", "topk", "config"}
DECODE_KEYS = {"format", "batch", "context", "num_heads", "num_kv_heads", "head_dim", "ms", "gbps",
               "frac_of_copy_bw", "frac_of_read_bw", "speedup_vs_sdpa_fp16", "bytes"}


def _positive(row, keys):
    for k in keys:
        assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row[k])


def _run_sweep(tmp_path, device, *argv):
    out = tmp_path / "sweep.json"
    assert cli.main(["ops", "--device", device, "--json", str(out), *TINY_SWEEP, *argv]) == 0
    return json.loads(out.read_text())


def _check_sweep(data):
    assert TOP_KEYS <= set(data)
    assert isinstance(data["device"], str) and data["device"]
    _positive(data, ["copy_bandwidth_gbps"])
    grid = [(b, c, f) for b in (1, 2) for c in (256, 272) for f in ("fp16", "int4", "int2c/int2")]
    assert [(r["batch"], r["context"], r["format"]) for r in data["decode"]] == grid
    for row in data["decode"]:
        assert DECODE_KEYS <= set(row)
        _positive(row, DECODE_KEYS - {"format"})
        assert (row["num_heads"], row["num_kv_heads"], row["head_dim"]) == (4, 2, 64)
        assert row["gbps"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
        assert row["frac_of_copy_bw"] == pytest.approx(row["gbps"] / data["copy_bandwidth_gbps"])
        # the same tokens as the dense baseline: fp16 holds them exactly
        assert math.isfinite(row["max_abs_err_vs_sdpa_fp16"])
        if row["format"] == "fp16":
            assert row["max_abs_err_vs_sdpa_fp16"] < 1e-2
    assert [(r["batch"], r["context"]) for r in data["sdpa"]] == [(b, c) for b in (1, 2) for c in (256, 272)]
    assert data["skipped"] == []
    assert [r["format"] for r in data["quantize_write"]] == ["fp16", "int4"]  # per-channel: sealed only
    assert [r["format"] for r in data["seal_blocks"]] == ["fp16", "int4", "int2c/int2"]
    for r in data["quantize_write"] + data["seal_blocks"]:
        _positive(r, ["ms", "bytes", "bytes_read", "bytes_written", "gbps", "frac_of_copy_bw"])
        assert r["bytes"] == r["bytes_read"] + r["bytes_written"]
    assert [(r["batch"], r["context"], r["k"]) for r in data["topk"]] == [(1, 512, 32), (16, 512, 32)]
    for r in data["topk"]:
        _positive(r, ["ms", "torch_topk_ms", "speedup_vs_torch_topk", "gbps"])
    # FlashInfer and flash-attn: timed per point, or said why not
    for b, c in [(b, c) for b in (1, 2) for c in (256, 272)]:
        timed = {r["name"] for r in data["baselines"] if (r["batch"], r["context"]) == (b, c)}
        missing = {r["name"] for r in data["baselines_unavailable"] if (r["batch"], r["context"]) == (b, c)}
        assert timed | missing == {"flash_attn_fp16", "flashinfer_fp16"}


@pytest.fixture(scope="module")
def cpu_sweep(tmp_path_factory):
    return _run_sweep(tmp_path_factory.mktemp("sweep"), "cpu")


def test_sweep_json_cpu(cpu_sweep):
    _check_sweep(cpu_sweep)
    assert cpu_sweep["config"]["query_dtype"] == "float16"
    assert cpu_sweep["baselines"] == []
    assert {r["reason"] for r in cpu_sweep["baselines_unavailable"]} == {"CUDA only"}


def test_sweep_plot(cpu_sweep, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    assert plots.plot_ops(cpu_sweep, str(png)) == str(png)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sweep_json_cuda(tmp_path):
    data = _run_sweep(tmp_path, "cuda")
    _check_sweep(data)
    assert isinstance(data["commit"], str)  # a sha, or "unknown" without .git / $KVCOMP_COMMIT
    assert all(r["graph"] for r in data["decode"] + data["sdpa"]), "decode and SDPA must be timed as graph replays"
    assert all(r["gqa"] == "enable_gqa" and r["backend"] == "flash" for r in data["sdpa"])
    for r in data["baselines"]:  # FlashInfer / flash-attn, where installed (graphs where they capture)
        _positive(r, ["ms", "gbps", "frac_of_copy_bw"])


def test_bar_checks():
    def dec(fmt, frac, speedup, batch=16, context=8192):
        return dict(format=fmt, batch=batch, context=context, frac_of_copy_bw=frac, speedup_vs_sdpa_fp16=speedup)
    result = {"decode": [dec("int4", 0.9, 3.5), dec("int4", 0.85, 2.9, context=32768), dec("int2", 0.1, 0.1, batch=1),
                         dec("fp16", 0.95, 1.0)],
              "topk": [dict(batch=1, context=32768, k=1024, speedup_vs_torch_topk=4.0)],
              "quantize_write": [dict(format="int8", op="quantize_write", tokens=65536, frac_of_copy_bw=0.5)]}
    checks = {c["check"]: c for c in report.bar_checks(result)}
    assert checks["decode int4: frac of copy BW"]["status"] == "PASS"
    assert checks["decode int4: x sdpa fp16"]["status"] == "FAIL"
    assert checks["decode int4: x sdpa fp16"]["at"] == "batch 16 ctx 32768"
    assert checks["decode fp16: frac of copy BW"]["status"] == "PASS"
    assert not any(k.startswith("decode int2") for k in checks)  # batch 1 is outside the bar's shapes
    assert checks["topk k=1024: x torch.topk"]["status"] == "PASS"
    assert checks["quantize_write >= 64k tokens: frac of copy BW"]["status"] == "FAIL"
    assert report.print_bar(result, plain=True) is False
