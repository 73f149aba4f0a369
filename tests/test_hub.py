"""`--model ORG/NAME` through huggingface_hub, offline, against a hub-style cache folder built here from the bundled
model's files: the same tokens as the bundled model, --revision, a local folder winning over a hub id, a clear
error for a model missing from the cache, and where files fitted for a hub model go."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("huggingface_hub")

from expertyard.assets import derived_files_dir  # noqa: E402
from expertyard.entrypoints.cli import main  # noqa: E402
from expertyard.entrypoints.common import bundled_model_path  # noqa: E402
from expertyard.errors import ConfigError  # noqa: E402
from expertyard.loader.hub import is_hub_id, resolve_model  # noqa: E402

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """HF_HUB_CACHE with models--test-org--tiny-moe at commit REV (refs/main and refs/v1 point at it), offline."""
    repo = tmp_path / "hub" / "models--test-org--tiny-moe"
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for f in bundled_model_path().iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    (repo / "refs" / "v1").write_text(REV)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return snapshot


def _generate(capsys, *extra) -> dict:
    code = main(["generate", "--prompt", "Once upon a time", "--temperature", "0", "--max-tokens", "6",
                 "--device", "cpu", "--json", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def test_hub_id_runs_the_cached_snapshot(hub_cache, capsys):
    bundled = _generate(capsys)
    assert _generate(capsys, "--model", "test-org/tiny-moe")["text"] == bundled["text"]
    assert _generate(capsys, "--model", "test-org/tiny-moe", "--revision", "v1")["text"] == bundled["text"]
    assert resolve_model("test-org/tiny-moe") == hub_cache
    assert resolve_model("test-org/tiny-moe", REV) == hub_cache


def test_missing_hub_model_or_revision_offline_is_a_clear_error(hub_cache, capsys):
    assert main(["generate", "--model", "test-org/no-such-model", "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "test-org/no-such-model" in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="revision v2"):
        resolve_model("test-org/tiny-moe", "v2")


def test_a_local_folder_wins_over_a_hub_id(hub_cache, tmp_path):
    local = tmp_path / "test-org" / "tiny-moe"  # the same name, relative to the working folder
    local.mkdir(parents=True)
    assert resolve_model("test-org/tiny-moe").resolve() == local
    assert resolve_model(local) == local
    with pytest.raises(ConfigError, match="--revision"):
        resolve_model("test-org/tiny-moe", "v1")


def test_hub_id_syntax():
    assert is_hub_id("Qwen/Qwen3-30B-A3B") and is_hub_id("mistralai/Mixtral-8x7B-v0.1")
    for name in ("/models/x", "./x/y", "../x/y", "a/b/c", "x", "a/../b"):
        assert not is_hub_id(name), name


def test_files_fitted_for_a_hub_model_or_the_bundled_one_go_to_the_user_cache(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert derived_files_dir(hub_cache) == tmp_path / "cache" / "expertyard" / "models" / "test-org--tiny-moe"
    assert derived_files_dir(bundled_model_path()) == tmp_path / "cache" / "expertyard" / "models" / "tiny-moe"
    own = tmp_path / "my-model"
    own.mkdir()
    assert derived_files_dir(own) == own.resolve()


def test_a_hub_model_is_served_under_its_id(hub_cache):
    from expertyard.entrypoints.cli import build_parser
    from expertyard.entrypoints.serve_cmd import served_name

    assert served_name(build_parser().parse_args(["serve", "--model", "test-org/tiny-moe"])) == "test-org/tiny-moe"
    assert served_name(build_parser().parse_args(["serve"])) == "tiny-moe"
