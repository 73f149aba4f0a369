"""The CLI on the bundled model, against transformers as the reference."""

import json
import math

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
                         "--dtype", "float32", "--prompt-len", "4", "--decode-tokens", "3", "--batch-sizes", "1,2",
                         "--json"])
    assert [r["batch"] for r in out["runs"]] == [1, 2]
    assert all(r["expertyard"]["decode_tokens_per_s"] > 0 for r in out["runs"])
    assert out["active_bytes_per_token"] > 0 and out["batch1_achieved_GBps"] > 0
