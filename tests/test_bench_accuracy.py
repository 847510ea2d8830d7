"""kvcomp-bench accuracy on a tiny random Llama with a tokenizer trained here
(no download): the CLI runs in --quick mode, its JSON has the documented
schema and the uncompressed-equivalent policy reproduces the reference
exactly; bad arguments exit with code 2 and say why."""
import json
import random

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from kvcomp import policies as P  # noqa: E402
from kvcomp.bench import cli  # noqa: E402
from kvcomp.bench import evaluate as ev  # noqa: E402

WORDS = "the a house river garden letter morning walked said quietly over under light dark".split()
POLICY_KEYS = {"policy", "spec", "bits_per_element", "bytes_per_token", "fraction_of_fp16", "needle",
               "prefill_seconds", "prefill_vs_uncompressed", "nll", "nll_ratio", "perplexity", "perplexity_ratio",
               "top1_agreement", "attn_rel_err", "attn_rel_err_per_layer"}
NEEDLE_KEYS = {"accuracy", "kept", "answerable", "accuracy_vs_uncompressed", "by_length", "grid",
               "same_answers_as_uncompressed"}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = random.Random(0)
    sentences = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                 for _ in range(800))
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(sentences) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, text):
    """A 2-layer Llama (head_dim 64, GQA 2/1) and a small byte-level BPE."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    extra = [ev.INTRO, ev.NEEDLE.format(key="0123456789"), ev.QUESTION, ev.FILLER]
    bpe.train_from_iterator([text.read_text()] + extra, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_quick_run_schema_and_exactness(tiny_model, text, tmp_path):
    out, png = tmp_path / "acc.json", tmp_path / "acc.png"
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text.read_text().split())) + "\n", encoding="utf-8")
    rc = cli.main(["accuracy", "--model", str(tiny_model), "--quick", "--policies",
                   "full,int8,h2o,q4_0,format:nf3:h@16", "--peers", "none", "--lengths", "256,320",
                   "--depths", "0,1", "--text", str(text), str(other), "--json", str(out), "--plot", str(png),
                   "--plain"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["geometry"] == {"num_layers": 2, "num_kv_heads": 1, "head_dim": 64}
    assert data["fp16_bytes_per_token"] == 2 * 2 * 2 * 64
    assert data["lengths"] == [256, 320] and data["depths"] == [0.0, 1.0]
    assert data["modes"] == ["first", "later"] and data["texts"] == [str(text), str(other)]
    assert len(data["needle_cases"]) == 8  # 2 texts x 2 lengths x 2 depths
    assert [c["text"] for c in data["needle_cases"]] == [str(text)] * 4 + [str(other)] * 4
    names = ["uncompressed", "full", "int8", "h2o", "q4_0", "format:nf3:h@16"]
    for case in data["needle_cases"]:
        assert list(case["answers"]) == names
        assert all(set(a) == {"first", "later"} for a in case["answers"].values())
        assert len(case["key"]) == 5 and case["key"].isdigit()
    pols = {p["policy"]: p for p in data["policies"]}
    assert list(pols) == names
    for p in pols.values():
        assert POLICY_KEYS <= set(p)
        for mode in ("first", "later"):
            n = p["needle"][mode]
            assert NEEDLE_KEYS <= set(n)
            assert len(n["grid"]) == 2 and all(len(r) == 2 for r in n["grid"])
            assert 0 <= n["accuracy"] <= 1
        assert 0 <= p["top1_agreement"] <= 1 and p["prefill_seconds"] > 0
        assert len(p["attn_rel_err_per_layer"]) == 2
    # Uncompressed-equivalent: same greedy answers in both modes and the same teacher-forced run.
    full = pols["full"]
    assert all(full["needle"][m]["same_answers_as_uncompressed"] == 1.0 for m in ("first", "later"))
    assert full["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert full["nll_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert full["top1_agreement"] == 1.0 and full["attn_rel_err"] < 1e-5
    assert full["fraction_of_fp16"] == {"256": 1.0, "320": 1.0}
    assert full["bits_per_element"] == {"256": 16.0, "320": 16.0}
    # Compression shows: int8 is close but not exact; h2o holds a fifth of the cache.
    assert 1e-5 < pols["int8"]["attn_rel_err"] < 0.05
    assert pols["h2o"]["fraction_of_fp16"]["320"] < 0.45
    assert pols["h2o"]["attn_rel_err"] > pols["int8"]["attn_rel_err"]
    # llama.cpp's q4_0 is int4:s, every token quantized: 4 bits + an fp16 scale per 32
    assert pols["q4_0"]["spec"]["cold_format"] == "int4:s" and pols["q4_0"]["spec"]["hot_window"] == 0
    assert pols["q4_0"]["bits_per_element"]["320"] == 4.5
    assert pols["format:nf3:h@16"]["spec"]["cold_format"] == "nf3:h"
    assert png.stat().st_size > 0 and (tmp_path / "acc-needle.png").stat().st_size > 0


def test_peers_bits_and_factory(tiny_model):
    """QuantizedCache peers: bits at equal footing (fp16 scale and zero per
    group of 64, half the 128-token residual in fp16) and a working cache."""
    from kvcomp.bench.peers import PEERS
    p = PEERS["quanto-int4"]
    assert p.bits_per_element(2048) == pytest.approx((4.5 * (2048 - 64) + 16 * 64) / 2048)
    assert PEERS["hqq-int2"].bits_per_element(32) == 16.0  # all of it in the residual
    if not p.available():
        pytest.skip("optimum-quanto is not installed")
    model = LlamaForCausalLM.from_pretrained(tiny_model)
    cache = p.factory(model.config)()
    ids = torch.randint(0, 100, (1, 300))
    from kvcomp.integrations.hf import cache_kwarg
    model(input_ids=ids, use_cache=True, **cache_kwarg(model, cache))
    assert cache.get_seq_length() == 300


def test_needle_case_has_exact_length_and_key():
    class Chars:  # a character-level tokenizer: one id per character
        def __call__(self, text, add_special_tokens=True):
            return type("E", (), {"input_ids": [ord(c) for c in text]})()

    tok, rng = Chars(), random.Random(1)
    for depth in (0.0, 0.3, 1.0):
        case = ev.needle_case(tok, ev.Filler(tok, None), 600, depth, rng)
        text = "".join(map(chr, case.ids[0].tolist()))
        assert case.ids.shape == (1, 600)
        assert text.startswith(ev.INTRO) and text.endswith(ev.QUESTION)
        at = text.index(ev.NEEDLE.format(key=case.key)) - len(ev.INTRO)
        fill = 600 - len(ev.INTRO) - len(ev.NEEDLE.format(key=case.key)) - len(ev.QUESTION)
        assert at == round(depth * fill)
    with pytest.raises(ValueError, match="too short"):
        ev.needle_case(tok, ev.Filler(tok, None), 100, 0.5, rng)
    assert ev.answer_of(" 12345.\n") == "12345" and ev.answer_of(" no key") is None


@pytest.mark.parametrize("args, message", [
    (["--policies", "full,nope"], "unknown policy 'nope'"),
    (["--depths", "0.5,1.5"], "depths in [0, 1]"),
    (["--lengths", "0"], "positive ints"),
    (["--trials", "-1"], "positive int"),
    (["--peers", "quanto-int3"], "unknown peer 'quanto-int3'"),
    (["--modes", "first,never"], "not a list of modes"),
    (["--policies", "format:int9@4"], "policy 'format:int9@4'"),
    (["--policies", "combined+pool=4"], "pool must be None or an odd int"),
    (["--policies", "combined+colour=red"], "'colour=red' is not <Policy field>=<value>"),
    (["--policies", "combined+pool"], "'pool' is not <Policy field>=<value>"),
    (["--policies", "nopreset+pool=5"], "unknown policy 'nopreset+pool=5'"),
])
def test_bad_arguments_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["accuracy", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_preset_with_fields_changed():
    from kvcomp.bench import accuracy
    p = accuracy._policy("combined+pool=7+observe=64+hot_format=None+budget=0.3")
    assert p == P.combined(pool=7, observe=64, budget=0.3, name="combined+pool=7+observe=64+hot_format=None+budget=0.3")


def test_errors_found_after_parsing_exit_2(tiny_model, text, tmp_path, capsys):
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    cases = [
        (["--model", str(tmp_path / "missing")], "not a folder with a config.json"),
        (["--model", str(vit)], "is not a causal LM"),
        (["--model", str(tiny_model), "--quick", "--lengths", "40"], "too short"),
        (["--model", str(tiny_model), "--quick", "--ppl-context", "64", "--ppl-tokens", "64"], "below --ppl-context"),
        (["--model", str(tiny_model), "--quick", "--text", str(tmp_path / "none.txt")], "--text"),
    ]
    for args, message in cases:
        assert cli.main(["accuracy", *args, "--plain"]) == 2, args
        assert message in capsys.readouterr().err, args


def test_generate_against_dynamic_cache(tiny_model, text, tmp_path):
    """kvcomp-bench generate: a row per cache and length (medians of the
    rounds), ratios against DynamicCache at the same length, bytes held from
    the cache itself."""
    out, png = tmp_path / "gen.json", tmp_path / "gen.png"
    rc = cli.main(["generate", "--model", str(tiny_model), "--policies", "full,int8", "--peers", "", "--lengths",
                   "64,128", "--new-tokens", "4", "--text", str(text), "--plain", "--json", str(out),
                   "--plot", str(png), "--repeats", "2"])
    assert rc == 0 and png.stat().st_size > 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["cache"], r["length"]) for r in rows] == \
        [(c, n) for n in (64, 128) for c in ("dynamic", "kvcomp:full", "kvcomp:int8")]
    for n in (64, 128):
        dc, full, int8 = (r for r in rows if r["length"] == n)
        assert dc["prefill_x"] == dc["decode_x"] == dc["bytes_x"] == 1.0
        per_token = 4 * 2 * 2 * 1 * 64  # fp32 x K,V x layers x KV heads x head_dim
        assert dc["held_bytes"] == per_token * (n + 4)
        assert full["held_bytes"] == per_token * -(-(n + 4) // 16) * 16  # whole blocks of 16
        assert int8["bytes_x"] > 3  # 1 byte + an fp16 scale per row of 64, against 4 bytes
        for r in (dc, full, int8):  # each figure is the median of its 2 rounds
            assert len(r["rounds"]) == 2
            assert r["prefill_s"] == pytest.approx(sum(x["prefill_s"] for x in r["rounds"]) / 2)
    assert cli.main(["generate", "--model", str(tiny_model), "--policies", "int9", "--text", str(text)]) == 2


def test_peer_prompt_file_and_answers_merge(tiny_model, text, tmp_path, capsys):
    """--prompts-out writes the run's prompts as ids (and stops); answers to
    them (here: made up, one peer always right, one always wrong) merge into
    the report scored like kvcomp's own; answers to other prompts are refused."""
    common = ["accuracy", "--model", str(tiny_model), "--quick", "--policies", "int8", "--peers", "none",
              "--lengths", "256", "--depths", "0,1", "--text", str(text), "--plain"]
    prompts = tmp_path / "prompts.json"
    assert cli.main(common + ["--prompts-out", str(prompts), "--peer-keep", "0.25"]) == 0
    shared = json.loads(prompts.read_text())
    assert shared["kind"] == "kvcomp.accuracy.prompts" and len(shared["cases"]) == 2
    assert shared["compression_ratio"] == 0.75 and len(shared["ppl"]["ids"]) == 1
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model)
    import re
    keys = [re.search(r"pass key is (\d{5})", tok.decode(c["ids"])).group(1) for c in shared["cases"]]
    right = [tok(" " + k, add_special_tokens=False).input_ids for k in keys]
    n = len(shared["ppl"]["ids"][0]) - shared["ppl"]["prefix"]
    peer = lambda answers, nll: {"press": None, "answers": {"first": answers, "later": answers},
                                 "prefill_seconds": 1.0, "nll": [[nll] * n], "error": None}
    answers = {"kind": "kvcomp.accuracy.peer-answers", "version": 1, "prompts_digest": shared["digest"],
               "torch": "x", "transformers": "5.2", "kvpress": "0.5.5", "threads": 1, "note": "masks",
               "compression_ratio": 0.75,
               "peers": {"uncompressed": peer(right, 2.0), "kvpress:right": peer(right, 2.2),
                         "kvpress:wrong": peer([[0]] * 2, 2.0), "kvpress:broken": {"error": "no"}}}
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(answers))
    out = tmp_path / "acc.json"
    assert cli.main(common + ["--peer-answers", str(path), "--peer-keep", "0.25", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    pols = {p["policy"]: p for p in data["policies"]}
    assert list(pols) == ["uncompressed", "int8", "kvpress-env:uncompressed", "kvpress:right", "kvpress:wrong"]
    for mode in ("first", "later"):
        assert pols["kvpress:right"]["needle"][mode]["accuracy"] == 1.0
        assert pols["kvpress:wrong"]["needle"][mode]["accuracy"] == 0.0
    assert pols["kvpress:right"]["nll_ratio"] == pytest.approx(1.1)
    assert pols["kvpress:right"]["bits_per_element"]["256"] == 4.0  # 16 bits x the 0.25 kept
    assert data["outside_peers"]["note"] == "masks"
    answers["prompts_digest"] = "0" * 64
    path.write_text(json.dumps(answers))
    assert cli.main(common + ["--peer-answers", str(path), "--peer-keep", "0.25"]) == 2
    assert "other prompts" in capsys.readouterr().err


def test_calibrated_policy_is_one_policy_per_layer_within_its_bits(tiny_model, text, tmp_path):
    out = tmp_path / "acc.json"
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text.read_text().split())) + "\n", encoding="utf-8")
    rc = cli.main(["accuracy", "--model", str(tiny_model), "--quick", "--policies", "int3,calibrated:3.0",
                   "--peers", "none", "--lengths", "256", "--depths", "0", "--modes", "first", "--text", str(text),
                   "--calibrate-text", str(other), "--json", str(out), "--plain"])
    assert rc == 0
    data = json.loads(out.read_text())
    cal = data["calibration"]
    assert cal["texts"] == [str(other)] and len(cal["layer_cost"]) == 2 and len(cal["choices"]["calibrated:3.0"]) == 2
    row = {p["policy"]: p for p in data["policies"]}["calibrated:3.0"]
    assert [layer["name"] for layer in row["spec"]["layers"]] == cal["choices"]["calibrated:3.0"]
    chosen_bits = sum(cal["bits"][c] for c in cal["choices"]["calibrated:3.0"]) / 2
    assert chosen_bits <= 3.0 and row["bits_per_element"]["256"] > 0


def test_calibrated_policy_needs_a_calibration_text(tiny_model, text, capsys):
    rc = cli.main(["accuracy", "--model", str(tiny_model), "--quick", "--policies", "calibrated:3", "--peers",
                   "none", "--lengths", "256", "--depths", "0", "--text", str(text)])
    assert rc == 2 and "--calibrate-text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["accuracy", "--model", str(tiny_model), "--policies", "calibrated:0"])
