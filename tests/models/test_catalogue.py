"""The catalogue, settings from the environment, and the `qubrid-lab` command line."""

from __future__ import annotations

import json

import pytest

from qubrid_lab.cli import main
from qubrid_lab.errors import InvalidRequestError, ModelNotFoundError
from qubrid_lab.models.catalogue import default_catalogue
from qubrid_lab.settings import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL, Settings


def test_defaults_are_the_bundled_models():
    catalogue = default_catalogue()
    assert catalogue.get(DEFAULT_CHAT_MODEL).kind == "chat"
    assert catalogue.get(DEFAULT_EMBEDDING_MODEL).kind == "embedding"
    assert all(entry.scheme == "bundled" for entry in catalogue.entries.values())


def test_unknown_id_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError) as caught:
        default_catalogue().get("nope")
    assert DEFAULT_CHAT_MODEL in caught.value.message and caught.value.param == "model"


def test_resolve_takes_directories_gguf_files_and_hub_ids(tmp_path):
    catalogue = default_catalogue()
    assert catalogue.resolve(str(tmp_path)).source == f"dir:{tmp_path.resolve()}"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert catalogue.resolve(str(gguf)).scheme == "gguf"
    hub = catalogue.resolve("someorg/some-model")
    assert (hub.source, hub.owned_by) == ("hf:someorg/some-model", "someorg")
    with pytest.raises(ModelNotFoundError):
        catalogue.resolve("not a model at all")


def test_catalogue_file_entries_are_checked(tmp_path):
    catalogue = default_catalogue()
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"id": "mine", "kind": "chat", "source": "hf:me/mine", "owned_by": "me"}]))
    catalogue.load_file(good)
    assert catalogue.get("mine").location == "me/mine"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "kind": "chat", "source": "ftp:x", "owned_by": "me"}]))
    with pytest.raises(InvalidRequestError, match="sources start with"):
        catalogue.load_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(InvalidRequestError, match="not a JSON list"):
        catalogue.load_file(broken)


def test_settings_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QUBRID_LAB_HOME", str(tmp_path))
    monkeypatch.setenv("QUBRID_LAB_MODELS", "a/b, c/d")
    monkeypatch.setenv("QUBRID_LAB_API_KEYS", "qbt_one,qbt_two")
    (tmp_path / "api_keys.txt").write_text("# keys\nqbt_three  # laptop\n\n")
    settings = Settings()
    assert settings.models == ["a/b", "c/d"]
    assert settings.load_api_keys() == {"qbt_one", "qbt_two", "qbt_three"}
    assert settings.database_path.parent == tmp_path


def test_keys_create_list_revoke_store_only_a_hash(tmp_path, capsys):
    assert main(["--home", str(tmp_path), "keys", "create", "--name", "alice", "--credits", "2.5", "--rpm", "10"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("qbt_") and len(key) > 40 and "alice" in out.err
    assert key not in (tmp_path / "qubrid_lab.sqlite3").read_bytes().decode("latin-1")
    assert not (tmp_path / "api_keys.txt").exists()
    assert main(["--home", str(tmp_path), "keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and key[:12] in listing and key not in listing and "2.5" in listing
    assert main(["--home", str(tmp_path), "keys", "create", "--name", "alice"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["--home", str(tmp_path), "keys", "revoke", key[:10]]) == 0
    assert main(["--home", str(tmp_path), "keys", "list"]) == 0
    assert "alice" not in capsys.readouterr().out
    assert main(["--home", str(tmp_path), "keys", "list", "--all"]) == 0
    assert "revoked" in capsys.readouterr().out


def test_serve_refuses_an_open_network_address(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "no API keys" in capsys.readouterr().err


@pytest.mark.parametrize("verb", [[], ["list"]])
def test_models_list_shows_each_entry_with_its_backend_and_status(tmp_path, capsys, verb, tiny_model_dir):
    extra = tmp_path / "catalogue.json"
    extra.write_text(
        json.dumps(
            [
                {"id": "mine", "kind": "chat", "source": f"dir:{tiny_model_dir}", "owned_by": "me"},
                {"id": "gone", "kind": "chat", "source": "dir:/no/such/model", "owned_by": "me"},
                {"id": "hub", "kind": "embedding", "source": "hf:someorg/never-downloaded", "owned_by": "someorg"},
            ]
        )
    )
    assert main(["--home", str(tmp_path), "models", *verb, "--catalogue-file", str(extra)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["id", "kind", "backend", "source", "status"]
    status = {row[0]: (row[1], row[2], row[4]) for row in rows[1:]}
    assert status[DEFAULT_CHAT_MODEL] == ("chat", "local", "ready (converted on its first load)")  # empty home
    assert status[DEFAULT_EMBEDDING_MODEL] == ("embedding", "local", "ready")
    assert status["mine"] == ("chat", "local", "ready")
    assert status["gone"] == ("chat", "local", "missing: /no/such/model does not exist")
    assert status["hub"] == ("embedding", "local", "downloaded from the Hub on its first load")


@pytest.mark.parametrize(
    ("item", "words"),
    [
        (
            {"id": "a", "kind": "chat", "backend": "openai", "base_url": "http://h/v1", "python": "/usr/bin/python3"},
            "unknown key 'python' for backend 'openai'",
        ),
        ({"id": "a", "kind": "chat", "backend": "openai", "base_url": "h:8000"}, "needs base_url"),
        ({"id": "a", "kind": "chat", "backend": "tgi", "base_url": "http://h/v1"}, "backend 'tgi'"),
        (
            {"id": "a", "kind": "chat", "source": "hf:x/y", "owned_by": "x", "base_url": "http://h/v1"},
            "unknown key 'base_url' for backend 'local'",
        ),
        ({"id": "a", "kind": "chat", "owned_by": "x"}, "key 'source' is required"),
        ({"id": "a", "kind": "image", "backend": "openai", "base_url": "http://h/v1"}, "kind 'image'"),
        ({"kind": "chat"}, "at least 'id' and 'kind'"),
    ],
)
def test_a_bad_catalogue_entry_is_refused_naming_the_entry_and_the_key(tmp_path, item, words):
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps([item]))
    with pytest.raises(InvalidRequestError, match=words) as refused:
        default_catalogue().load_file(path)
    assert "entry 0" in refused.value.message


def test_an_openai_entry_defaults_its_upstream_model_and_owner(tmp_path):
    path = tmp_path / "catalogue.json"
    path.write_text(
        json.dumps(
            [{"id": "team/llama", "kind": "chat", "backend": "openai", "base_url": "http://vllm.internal:8000/v1"}]
        )
    )
    catalogue = default_catalogue()
    catalogue.load_file(path)
    entry = catalogue.get("team/llama")
    assert (entry.upstream_model, entry.owned_by, entry.api_key_env) == ("team/llama", "vllm.internal", "")
