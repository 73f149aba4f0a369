"""The trained pre-gate predictor: recall, fitting, the predictor file, `expertyard pregate fit`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED
from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.errors import ConfigError
from expertyard.experts.predictors import NextGatePredictor, NoPredictor, TrainedPredictor, make_predictor
from expertyard.experts.predictors.trained import (FrequencyPredictor, RoutingData, collect_routing, recall_at_k,
                                                   recall_by_distance)
from expertyard.loader.load import load_model

TINYSTORIES = SHARED / "data" / "corpora" / "tinystories-sample.txt"


def tiny_engine(path, dtype=torch.float32) -> LLMEngine:
    return LLMEngine(load_model(path, "cpu", dtype, progress=False), None, EngineConfig(max_num_seqs=1),
                     eos_token_ids=set())


def random_docs(n: int, length: int, vocab: int = 128, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (length,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def fitted(tiny_checkpoint):
    """arch -> (engine, routing data on random tokens, predictor fitted at depth 3)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            engine = tiny_engine(tiny_checkpoint(arch)[0])
            data = collect_routing(engine, random_docs(16, 64))
            cache[arch] = engine, data, TrainedPredictor.fit(engine.model, data, depth=3, epochs=30, batch_size=256)
        return cache[arch]

    return get


def test_recall_at_k_by_hand():
    pred = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0]])
    true = torch.tensor([[2, 1, 9], [9, 8, 7], [0, 6, 7]])
    torch.testing.assert_close(recall_at_k(pred, true), torch.tensor([2 / 3, 0.0, 1.0]))


def test_recall_by_distance_by_hand():
    """Two MoE layers ahead of layer 0; recall per distance averages over tokens, then over source layers."""
    ids = {0: torch.tensor([[0, 1], [0, 1]]), 1: torch.tensor([[2, 3], [2, 4]]), 2: torch.tensor([[5, 6], [7, 6]])}
    data = RoutingData({l: torch.zeros(2, 4) for l in ids}, {l: torch.zeros(2, 8) for l in ids}, ids, [2])
    freq = FrequencyPredictor(data, [0, 1, 2], top_k=2, num_experts=8, depth=2)
    # the frequency baseline predicts layer 1 -> {2, 3 or 4} and layer 2 -> {6, 5 or 7}
    assert freq.top[1][0] == 2 and freq.top[2][0] == 6
    r = recall_by_distance(freq, data)
    # j=1: from layer 0 (targets layer 1) and layer 1 (targets layer 2); j=2: from layer 0 only
    r1_layer1 = float(recall_at_k(freq.top[1].expand(2, -1), ids[1]).mean())
    r1_layer2 = float(recall_at_k(freq.top[2].expand(2, -1), ids[2]).mean())
    assert r == pytest.approx([(r1_layer1 + r1_layer2) / 2, r1_layer2])
    assert r1_layer1 == pytest.approx(0.75) and r1_layer2 == pytest.approx(0.75)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_fit_does_not_lose_recall(fitted, arch):
    engine, data, trained = fitted(arch)
    moe_layers = list(engine.model.cfg.moe_layers)
    assert sorted(data.x) == moe_layers and data.num_tokens == 16 * 64
    k = engine.model.cfg.moe.top_k
    assert all(data.ids[l].shape == (data.num_tokens, k) for l in moe_layers)
    base = recall_by_distance(NextGatePredictor(engine.model, 3), data)
    mine = recall_by_distance(trained, data)
    assert len(mine) == len(base) == min(3, len(moe_layers) - 1)
    assert all(m >= b - 0.01 for m, b in zip(mine, base)), (mine, base)
    assert sum(mine) > sum(base), (mine, base)


def test_collect_routing_matches_the_router(fitted):
    engine, data, _ = fitted("qwen3_moe")
    layer = engine.model.cfg.moe_layers[1]
    gate = engine.model.layers[layer].mlp.gate
    ids, _ = gate.select(gate.logits(data.x[layer]))
    assert recall_at_k(ids, data.ids[layer]).mean() > 0.99  # x is kept in float16: a rare near-tie may flip


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_save_load_round_trip_and_shapes(fitted, tiny_checkpoint, tmp_path, arch, depth):
    engine, data, trained = fitted(arch)
    path = tmp_path / "p.safetensors"
    trained.save(path)
    loaded = make_predictor("trained", engine.model, tiny_checkpoint(arch)[0], depth, path)
    moe_layers = list(engine.model.cfg.moe_layers)
    k = engine.model.cfg.moe.top_k
    for i, layer in enumerate(moe_layers):
        x = data.x[layer][:50]
        got, full = loaded.predict(layer, x), trained.predict(layer, x)
        assert [t for t, _ in got] == moe_layers[i + 1:i + 1 + depth]  # fewer near the last layer
        assert all(ids.shape == (50, k) and ids.dtype == torch.long for _, ids in got)
        for (t1, a), (t2, b) in zip(got, full):  # a shallower load keeps the nearest targets' rows
            assert t1 == t2 and torch.equal(a, b)
    assert loaded.predict(moe_layers[-1], data.x[moe_layers[-1]][:5]) == []


def test_default_file_beside_model_and_depth_errors(fitted, tiny_checkpoint, tmp_path):
    engine, _, trained = fitted("qwen3_moe")
    with pytest.raises(ConfigError, match="pregate fit"):
        TrainedPredictor.load(tmp_path, engine.model, 1)  # nothing there yet
    trained.save(tmp_path / "pregate.safetensors")
    assert TrainedPredictor.load(tmp_path, engine.model, 2).depth == 2
    shallow = tmp_path / "shallow.safetensors"
    TrainedPredictor(trained.moe_layers, trained.top_k, 1,
                     {l: w[:8] for l, w in trained.weights.items()}, {l: b[:8] for l, b in trained.biases.items()},
                     trained.meta | {"depth": 1}).save(shallow)
    with pytest.raises(ConfigError, match="depth 1.*depth 3"):
        TrainedPredictor.load(None, engine.model, 3, shallow)


def test_predictor_of_another_model_is_refused(fitted, tiny_checkpoint, tmp_path):
    _, _, trained = fitted("qwen3_moe")
    path = tmp_path / "qwen.safetensors"
    trained.save(path)
    other = tiny_engine(tiny_checkpoint("deepseek_v2")[0]).model
    with pytest.raises(ConfigError, match="qwen.safetensors.*another model"):
        TrainedPredictor.load(None, other, 1, path)
    same_shapes = tiny_engine(tiny_checkpoint("qwen3_moe")[0]).model  # same architecture, one router changed
    same_shapes.layers[1].mlp.gate.weight.data[0, 0] += 0.5
    with pytest.raises(ConfigError, match="qwen.safetensors.*router_hash"):
        TrainedPredictor.load(None, same_shapes, 1, path)
    not_a_predictor = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(not_a_predictor))
    with pytest.raises(ConfigError, match="not a pre-gate predictor"):
        TrainedPredictor.load(None, same_shapes, 1, not_a_predictor)


def test_router_hash_does_not_depend_on_load_dtype(fitted, tiny_checkpoint, tmp_path):
    engine, _, trained = fitted("qwen3_moe")
    path = tmp_path / "p.safetensors"
    trained.save(path)
    bf16 = tiny_engine(tiny_checkpoint("qwen3_moe")[0], torch.bfloat16).model
    p = TrainedPredictor.load(None, bf16, 3, path)
    x = torch.randn(7, bf16.cfg.hidden_size, dtype=torch.bfloat16)
    assert [ids.shape for _, ids in p.predict(0, x)] == [(7, bf16.cfg.moe.top_k)] * 2


def test_load_predictor_by_name(fitted):
    engine, _, _ = fitted("qwen3_moe")
    assert isinstance(make_predictor("none", engine.model, None, 1), NoPredictor)
    assert isinstance(make_predictor("next-gate", engine.model, None, 2), NextGatePredictor)
    with pytest.raises(ConfigError, match="none, next-gate, trained"):
        make_predictor("oracle-ish", engine.model, None, 1)
    with pytest.raises(ConfigError, match="predictor-path"):
        make_predictor("trained", engine.model, None, 1)


def test_unwritable_model_folder_asks_for_out(monkeypatch, tmp_path, capsys):
    from expertyard.entrypoints import cli, pregate_cmd

    text = tmp_path / "t.txt"
    text.write_text("a<|endoftext|>b")
    monkeypatch.setattr(pregate_cmd.os, "access", lambda *a: False)
    assert cli.main(["pregate", "fit", "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "pass --out FILE" in err


@pytest.mark.skipif(not TINYSTORIES.is_file(), reason="needs ../shared/data/corpora/tinystories-sample.txt")
def test_cli_fits_the_bundled_model(tmp_path, capsys):
    import shutil

    from expertyard.entrypoints import cli
    from expertyard.entrypoints.common import bundled_model_path

    model_dir = tmp_path / "tiny-moe"
    shutil.copytree(bundled_model_path(), model_dir)
    text = tmp_path / "stories.txt"
    text.write_text("<|endoftext|>".join(TINYSTORIES.read_text(encoding="utf-8")[:60_000].split("<|endoftext|>")[:-1]))
    argv = ["pregate", "fit", "--model", str(model_dir), "--text", str(text), "--max-tokens", "2500", "--epochs", "4",
            "--device", "cpu", "--json"]
    out = model_dir / "pregate.safetensors"  # the default
    if cli.main(argv) != 0:  # refused up front where the loader would take the file for a checkpoint shard
        assert "pass --out FILE" in capsys.readouterr().err and not out.exists()
        out = tmp_path / "elsewhere.safetensors"
        assert cli.main(argv + ["--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(out) and out.is_file()
    assert result["train_tokens"] + result["heldout_tokens"] == 2500 and result["heldout_documents"] >= 1
    assert set(result["heldout_recall"]) == {"next-gate", "trained", "frequency"}
    assert all(len(r) == 3 for r in result["heldout_recall"].values())
    train = result["train_recall"]
    assert train["trained"][0] > train["next-gate"][0] and train["trained"][2] > train["next-gate"][2]
    model = load_model(model_dir, "cpu", torch.float32, progress=False).model  # still loads
    p = make_predictor("trained", model, model_dir, 3, None if out.parent == model_dir else out)
    assert [t for t, _ in p.predict(0, torch.randn(3, 256))] == [1, 2, 3]
    assert p.meta["fit"]["text"] == "stories.txt"
