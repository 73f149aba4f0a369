"""The CLI on the bundled model, against transformers as the reference."""

import json
import math
import shutil

import pytest
import torch

from expertyard.entrypoints.cli import main
from expertyard.entrypoints.common import bundled_model_path


@pytest.fixture(scope="module")
def hf_bundled():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_generate_greedy_equals_transformers(capsys, hf_bundled, scheduling):
    hf, tok = hf_bundled
    out = _json(capsys, ["generate", "--prompt", "Once upon a time", "--temperature", "0", "--max-tokens", "24",
                         "--device", "cpu", "--async-scheduling", scheduling, "--json"])
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    assert out["text"] == tok.decode(ref, skip_special_tokens=True)
    assert out["completion_tokens"] == 24 and out["finish_reason"] == "length"
    assert "Lily" in out["text"] or "little" in out["text"]  # the bundled model tells stories


def test_generate_offloaded_equals_resident(capsys):
    base = ["generate", "--prompt", "The king said", "--temperature", "0", "--max-tokens", "16", "--device", "cpu",
            "--json"]
    resident = _json(capsys, base)
    offloaded = _json(capsys, base + ["--offload", "--gpu-memory-budget", "650MiB", "--predictor", "next-gate"])
    assert offloaded["text"] == resident["text"]
    assert offloaded["offload"]["misses"] > 0
    overlapped = _json(capsys, base + ["--offload", "--gpu-memory-budget", "650MiB", "--predictor", "next-gate",
                                       "--async-scheduling", "on"])
    assert overlapped["text"] == resident["text"]


def test_eval_perplexity_equals_transformers(capsys, hf_bundled, tmp_path):
    hf, tok = hf_bundled
    text = "Once upon a time, there was a little dog named Max. Max liked to run in the park with his ball. " * 3
    (tmp_path / "t.txt").write_text(text)
    out = _json(capsys, ["eval", "--text", str(tmp_path / "t.txt"), "--device", "cpu", "--window", "1024", "--json"])
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf(ids).logits[0, :-1]
    nll = -logits.log_softmax(-1).gather(1, ids[0, 1:, None]).sum().item()
    assert out["tokens"] == ids.shape[1] - 1
    assert out["perplexity"] == pytest.approx(math.exp(nll / (ids.shape[1] - 1)), rel=1e-4)


def test_eval_sliding_window_scores_every_token_once(capsys, tmp_path):
    (tmp_path / "t.txt").write_text("The cat sat on the mat. " * 40)
    whole = _json(capsys, ["eval", "--text", str(tmp_path / "t.txt"), "--device", "cpu", "--json"])
    windowed = _json(capsys, ["eval", "--text", str(tmp_path / "t.txt"), "--device", "cpu", "--window", "64",
                              "--stride", "16", "--json"])
    assert windowed["tokens"] == whole["tokens"]
    assert windowed["perplexity"] >= whole["perplexity"] * 0.999  # less context never helps much here


def test_user_errors_are_messages_not_tracebacks(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not supported" in err and "MixtralForCausalLM" in err and "Traceback" not in err
    assert main(["generate", "--prompt", "word " * 300, "--max-model-len", "64", "--device", "cpu"]) == 2
    assert "max_model_len is 64" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--offload", "--gpu-memory-budget", "1MiB", "--device", "cpu"]) == 2
    assert "need at least" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--async-scheduling", "both", "--device", "cpu"]) == 2
    assert "pick on or off" in capsys.readouterr().err


def test_bench_reports_throughput_and_bytes(capsys):
    out = _json(capsys, ["bench", "--synthetic", "olmoe-1b-7b", "--num-layers", "1", "--device", "cpu",
                         "--dtype", "bfloat16", "--prompt-len", "4", "--decode-tokens", "3", "--batch-sizes", "1,2",
                         "--json"])
    assert [r["batch"] for r in out["runs"]] == [1, 2]
    assert all(r["expertyard"]["decode_tokens_per_s"] > 0 for r in out["runs"])
    assert out["active_bytes_per_token"] > 0 and out["batch1_achieved_GBps"] > 0


def _parsers(parser, name="expertyard"):
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_flag_has_a_help_line_and_each_default_shows_once():
    import argparse

    from expertyard.entrypoints.cli import build_parser

    names = []
    for name, parser in _parsers(build_parser()):
        names.append(name)
        formatter = parser._get_formatter()
        parser.format_help()  # formats every help string (a bad %-format raises)
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action) if action.help else ""
            flag = f"{name} {action.option_strings[-1]}"
            assert text.strip(), f"{flag} has no help line"
            assert text.count("(default") <= 1 and "(default: None)" not in text, f"{flag}: {text}"
            if action.default not in (None, False, [], argparse.SUPPRESS) and not isinstance(action.default, bool):
                assert "default" in text, f"{flag} does not say its default {action.default!r}"
    assert {"expertyard generate", "expertyard eval", "expertyard serve", "expertyard pregate fit"} <= set(names)


def test_python_dash_m_expertyard_is_the_command():
    import os
    import subprocess
    import sys

    from expertyard import __version__

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "expertyard", "--version"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"expertyard {__version__}"
    out = subprocess.run([sys.executable, "-m", "expertyard", "generate", "--temperature", "-1", "--prompt", "x"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "--temperature -1.0 must be" in out.stderr


def test_sampling_flags_are_checked_before_the_model_loads(capsys, monkeypatch):
    from expertyard.entrypoints import generate

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(generate, "engine_from_args", no_loading)
    for flags, words in ((["--temperature", "-1"], "--temperature -1.0"), (["--top-p", "0"], "--top-p 0.0"),
                         (["--top-k", "-2"], "--top-k -2"), (["--max-tokens", "0"], "--max-tokens 0"),
                         (["--system", "Be brief."], "--system needs --chat")):
        assert main(["generate", "--prompt", "x", *flags]) == 2
        assert words in capsys.readouterr().err


def test_eval_scores_the_shipped_heldout_text_by_default(capfd):
    """No --text: the TinyStories stories held out from the bundled model's training, shipped in the package; no
    warning that the text is longer than the tokenizer's nominal length (the window handles that)."""
    from expertyard.assets import heldout_text_path

    assert main(["eval", "--max-tokens", "300", "--window", "128", "--device", "cpu", "--json"]) == 0
    out, err = capfd.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["text"] == str(heldout_text_path()) and result["tokens"] == 299
    assert 5 < result["perplexity"] < 60  # held-out TinyStories perplexity of the bundled model is ~20
    assert "Token indices sequence length" not in err
    assert heldout_text_path().stat().st_size < 200_000


def test_progress_bars_end_their_line(capsys, bundled_engine):
    """Eval's loop breaks before the last window start: its bar must still be closed (newline) before the result;
    the loading bar ends its line too, so that the next line does not land on it."""
    from expertyard.entrypoints.evaluate import perplexity
    from expertyard.loader import load_model

    engine = bundled_engine()
    tokens = engine.encode("Once upon a time there was a little dog. " * 6)[:50]
    perplexity(engine, tokens, window=32, stride=16, progress=True)
    err = capsys.readouterr().err
    assert "eval" in err and err.endswith("\n")
    load_model(bundled_model_path(), "cpu", torch.float32, progress=True)
    err = capsys.readouterr().err
    assert "loading tiny-moe" in err and err.endswith("\n")


def test_pregate_fit_never_writes_into_the_package(tmp_path, monkeypatch):
    """Without --out, the predictor for the bundled model goes to the user's cache, and `--predictor trained`
    reads it from there first (the one shipped beside the model otherwise)."""
    from expertyard.entrypoints.cli import build_parser
    from expertyard.entrypoints.pregate_cmd import _out_path
    from expertyard.errors import ConfigError
    from expertyard.experts.predictors.trained import FILE_NAME, default_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "expertyard" / "models" / "tiny-moe" / FILE_NAME
    assert default_path(bundled_model_path()) == bundled_model_path() / FILE_NAME  # nothing fitted yet
    args = build_parser().parse_args(["pregate", "fit", "--text", "t.txt"])
    out = _out_path(args)
    assert out == cached and bundled_model_path().resolve() not in out.resolve().parents
    shutil.copy(bundled_model_path() / FILE_NAME, cached)
    assert default_path(bundled_model_path()) == cached
    own = tmp_path / "my-model"  # a model of the user's own: beside it
    own.mkdir()
    (own / "model.safetensors.index.json").write_text("{}")
    args = build_parser().parse_args(["pregate", "fit", "--text", "t.txt", "--model", str(own)])
    assert _out_path(args) == own.resolve() / FILE_NAME
    missing = tmp_path / "no-such-model"  # a mistyped --model is an error, and no folder is made for it
    with pytest.raises(ConfigError, match="does not exist"):
        _out_path(build_parser().parse_args(["pregate", "fit", "--text", "t.txt", "--model", str(missing)]))
    assert not missing.exists()
