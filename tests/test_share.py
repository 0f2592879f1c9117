"""Sharing: `autoenc export` writes a folder (config.json, model.safetensors, a model card, pictures) that
loads and serves every command exactly as the run does, holds no pickle, and is refused in one line when
tampered with; Hub models load from huggingface_hub's cache offline, and a push goes through the library's
own upload with its HTTP client replaced."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
import torch

import autoenc
from conftest import autoenc as cli, cli_error, cli_here, train_run


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    train_run(root / "run", "model=vae", "model.latent_dim=3")
    cli("export", f"ckpt={root / 'run'}", f"out={root / 'folder'}", "license=mit")
    return root


def test_an_exported_folder_gives_the_runs_outputs_bit_for_bit(shared):
    run, folder = autoenc.load(shared / "run", device="cpu"), autoenc.load(shared / "folder", device="cpu")
    x, _ = run.split("test")
    assert torch.equal(run.encode(x), folder.encode(x))
    assert torch.equal(run.reconstruct(x), folder.reconstruct(x))
    assert torch.equal(run.sample(5, seed=3), folder.sample(5, seed=3))
    assert folder.shape == run.shape and folder.latent_dim == 3


def test_every_command_reads_the_folder_as_it_reads_the_run(shared, capsys):
    for ckpt in ("run", "folder"):
        cli_here("encode", f"ckpt={shared / ckpt}", f"out={shared / f'codes_{ckpt}.npz'}")
    with np.load(shared / "codes_run.npz") as a, np.load(shared / "codes_folder.npz") as b:
        assert np.array_equal(a["code"], b["code"]) and np.array_equal(a["label"], b["label"])


def test_the_folder_holds_no_pickle_and_opens_with_safetensors_alone(shared):
    from safetensors import safe_open

    folder = shared / "folder"
    names = sorted(p.name for p in folder.iterdir())
    assert {"README.md", "config.json", "model.safetensors", "reconstructions.png", "samples.png"} <= set(names)
    for path in folder.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", path  # neither a pickle nor a torch zip archive
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("autoencoder.encoder.") for k in keys)
    described = json.loads((folder / "config.json").read_text())
    assert described["shape"] == [1, 8, 8] and described["config"]["model"]["latent_dim"] == 3
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: autoenc\nlicense: mit\n") and "autoenc train" in card
    assert "| test/loss |" in card and "![samples](samples.png)" in card


def test_a_tampered_folder_is_refused_in_one_line(shared, tmp_path, capsys):
    bigger = shutil.copytree(shared / "folder", tmp_path / "bigger")
    described = json.loads((bigger / "config.json").read_text())
    described["config"]["model"]["latent_dim"] = 4
    (bigger / "config.json").write_text(json.dumps(described))
    assert cli_error(capsys, "sample", f"ckpt={bigger}").startswith(
        f"autoenc: error: {bigger} is from a different model than this config builds")
    cut = shutil.copytree(shared / "folder", tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:100])
    assert cli_error(capsys, "sample", f"ckpt={cut}").startswith(
        f"autoenc: error: {cut} is not a model folder that `autoenc export` wrote")


def test_export_never_writes_into_a_folder_that_holds_something(shared, capsys):
    assert cli_error(capsys, "export", f"ckpt={shared / 'run'}", f"out={shared / 'folder'}").startswith(
        f"autoenc: error: out={shared / 'folder'} exists and is not empty")


def fill_hub_cache(cache, repo: str, folder) -> None:
    """huggingface_hub's cache layout, as a download leaves it: models--owner--name/refs/main naming a commit,
    snapshots/<commit>/ holding the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_a_hub_model_loads_from_the_cache_offline_and_commands_write_beside_the_user(shared, tmp_path):
    fill_hub_cache(tmp_path / "hub", "me/tiny-vae", shared / "folder")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cli("reconstruct", "ckpt=hf://me/tiny-vae", "n=4", cwd=tmp_path, env=env)
    assert (tmp_path / "outputs" / "hf" / "me--tiny-vae" / "commands" / "reconstruct_test.png").is_file()
    proc = cli("sample", "ckpt=hf://me/other", cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "autoenc: error: hf://me/other is not in the Hugging Face cache and the Hub cannot be reached (offline, "
        "or HF_HUB_OFFLINE=1); connect once to download it, or give a local folder"]


def test_push_uploads_the_folder_through_huggingface_hubs_own_api(shared, monkeypatch):
    """Covered: autoenc's call of the library (create the repository, private; upload every file of the
    folder, byte for byte) and the library's requests up to its HTTP client. Not covered: the Hub's own
    answers (they are stand-ins here) and large-file (LFS) uploads."""
    import httpx
    from huggingface_hub.utils import _http

    from autoenc.app.share import push

    requests, uploaded = [], {}

    def hub(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        requests.append((request.method, url, request.content))
        if url.endswith("/api/repos/create"):
            return httpx.Response(200, json={"url": "https://huggingface.co/me/tiny-vae", "name": "me/tiny-vae"})
        if url.endswith("/api/validate-yaml"):
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in url:
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
        if "/commit/" in url:
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/tiny-vae/commit/1",
                                             "commitOid": "1" * 40})
        return httpx.Response(404, json={"error": "not a stand-in"})

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    _http.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub)))
    try:
        url = push(shared / "folder", "me/tiny-vae")
    finally:
        _http.set_client_factory(_http.default_client_factory)
    assert url == "https://huggingface.co/me/tiny-vae"
    create = next(json.loads(body) for method, u, body in requests if u.endswith("/api/repos/create"))
    assert create["name"] == "tiny-vae" and create["organization"] == "me"
    assert create.get("visibility") == "private" or create.get("private") is True  # (the field's name by release)
    folder = shared / "folder"
    assert uploaded == {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_model_loads_and_works_where_its_training_data_is_not(tmp_path, capsys):
    """Checkpoints store the shape of an example, so loading a model reads no data: with the training file
    gone, sample and encode of other inputs work, and a split that needs the data is one line."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.random((200, 6), dtype=np.float32))
    train_run(tmp_path / "run", "model=vae", "data=array", f"data.path={tmp_path / 'train.npy'}", "model.latent_dim=2")
    (tmp_path / "train.npy").unlink()
    np.save(tmp_path / "new.npy", rng.random((5, 6), dtype=np.float32))
    cli_here("encode", f"ckpt={tmp_path / 'run'}", f"input={tmp_path / 'new.npy'}", f"out={tmp_path / 'codes.npz'}")
    with np.load(tmp_path / "codes.npz") as codes:
        assert codes["code"].shape == (5, 2)
    assert autoenc.load(tmp_path / "run", device="cpu").sample(3).shape == (3, 6)
    assert "train.npy" in cli_error(capsys, "encode", f"ckpt={tmp_path / 'run'}")
