"""The Python API: load a run or a lone checkpoint, the same answers as the commands' files for any input
form, latent arithmetic on a case with a known answer, training from Python."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import autoenc
from autoenc.util.errors import UserError
from conftest import FAST, autoenc as cli, one_line_error, train_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("api") / "ae"
    train_run(run_dir, "model.latent_dim=5", "trainer.max_epochs=2")
    return run_dir


@pytest.fixture(scope="module")
def model(run):
    return autoenc.load(run, device="cpu")


def test_load_from_a_run_directory_and_from_a_lone_checkpoint_give_the_same_model(run, model, tmp_path):
    lone = tmp_path / "elsewhere.ckpt"  # no .hydra/ next to it: the config stored in the checkpoint is used
    shutil.copy(run / "checkpoints" / "best.ckpt", lone)
    other = autoenc.load(lone, device="cpu")
    x = torch.rand(6, 1, 8, 8)
    assert torch.equal(model.encode(x), other.encode(x))
    assert model.latent_dim == 5 and model.shape == (1, 8, 8) and model.results["test/loss"] > 0


def test_every_input_form_gives_the_same_codes(model, tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    paths = []
    for i, g in enumerate(grey):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(g).save(paths[-1])
    expected = model.encode(torch.from_numpy(grey).float().div(255)[:, None])
    for form in (grey, torch.from_numpy(grey), [Image.fromarray(g) for g in grey], paths, [str(p) for p in paths], tmp_path):
        assert torch.allclose(model.encode(form), expected, atol=1e-6), type(form)
    assert isinstance(model.encode(grey, numpy=True), np.ndarray)
    assert torch.allclose(model.encode(grey[0]), expected[:1], atol=1e-6)  # one example, without its batch axis


def test_images_of_another_size_are_decoded_as_the_commands_decode_them(run, model, tmp_path):
    """20×14 PNGs for an 8×8 model: the API's codes of the folder, the files and the PIL images equal those
    `autoenc encode input=DIR` writes (one decoding path: antialiased resize, the run's crop)."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (14, 20), dtype=np.uint8)).save(folder / f"{i}.png")
    cli("encode", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"input={folder}", f"out={tmp_path / 'codes.npz'}")
    expected = np.load(tmp_path / "codes.npz")["code"]
    files = sorted(folder.glob("*.png"))
    for form in (folder, files, [Image.open(f) for f in files]):
        assert np.allclose(model.encode(form, numpy=True), expected, atol=1e-6), type(form)


def test_the_api_answers_what_the_commands_write(run, model, tmp_path):
    ckpt = run / "checkpoints" / "best.ckpt"
    x, y = model.split("test")
    cli("encode", f"ckpt={ckpt}", f"out={tmp_path / 'codes.npz'}")
    codes = np.load(tmp_path / "codes.npz")
    assert np.allclose(codes["code"], model.encode(x, numpy=True), atol=1e-6)
    assert np.array_equal(codes["label"], y.numpy())
    cli("decode", f"ckpt={ckpt}", f"codes={tmp_path / 'codes.npz'}", f"out={tmp_path / 'decoded.npz'}")
    assert np.allclose(np.load(tmp_path / "decoded.npz")["x_hat"], model.decode(codes["code"], numpy=True), atol=1e-6)
    assert torch.allclose(model.decode(model.encode(x)), model.reconstruct(x), atol=1e-6)
    cli("score", f"ckpt={ckpt}", f"out={tmp_path / 'score.csv'}")
    written = np.load(tmp_path / "score.npz")
    scores = model.score(x, numpy=True)
    for column in ("mse", "recon_nll", "score"):
        assert np.allclose(written[column], scores[column], rtol=1e-5)
    x_hat = model.reconstruct(x[:3])
    assert torch.allclose(model.score(x[:3])["mse"], (x_hat - model.input(x[:3])).pow(2).flatten(1).mean(1), atol=1e-7)


def test_sampling_or_a_likelihood_without_a_prior_is_refused_in_one_line(model):
    with pytest.raises(UserError, match="bottleneck=linear has no prior to sample from"):
        model.sample(4)
    with pytest.raises(UserError, match="no posterior and prior"):
        model.log_likelihood(torch.rand(2, 1, 8, 8))
    with pytest.raises(UserError, match=r"do not fit this model, which takes \(1, 8, 8\)"):
        model.encode(torch.rand(2, 3, 8, 8))


def test_an_attribute_vector_is_the_difference_of_class_mean_codes_and_moves_examples_along_it(tmp_path):
    """Two classes of vectors that differ by a known direction d; an encoder and decoder made the identity:
    the vector is d's sample estimate, and shifting an example of class 0 by strength s adds s·d."""
    rng = np.random.default_rng(0)
    d = np.zeros(6, np.float32)
    d[2] = 3.0
    x = rng.normal(0, 0.1, (400, 6)).astype(np.float32)
    y = np.arange(400) % 2
    x[y == 1] += d
    np.savez(tmp_path / "two.npz", x=x, y=y)
    train_run(tmp_path / "run", "data=array", f"data.path={tmp_path / 'two.npz'}", "net=mlp_shallow",
              "likelihood=mse", "model.latent_dim=6", "trainer.max_epochs=1")
    m = autoenc.load(tmp_path / "run", device="cpu")
    with torch.no_grad():  # z = x and x̂ = z exactly
        enc, dec = m.autoencoder.encoder[1], m.autoencoder.decoder[0]
        enc.weight.copy_(torch.eye(6)), enc.bias.zero_(), dec.weight.copy_(torch.eye(6)), dec.bias.zero_()
    x_tr, y_tr = m.split("train")
    expected = x_tr[y_tr == 1].double().mean(0) - x_tr[y_tr == 0].double().mean(0)
    vector = m.attribute(to=1, from_=0)
    assert torch.allclose(vector.double(), expected, atol=1e-5) and abs(float(vector[2]) - 3.0) < 0.1
    moved = m.shift(x[:3], vector, strengths=[0.0, 1.0, -2.0])
    assert torch.allclose(moved[:, 1], torch.from_numpy(x[:3]) + vector, atol=1e-5)
    assert torch.allclose(moved[:, 2], torch.from_numpy(x[:3]) - 2 * vector, atol=1e-5)
    with pytest.raises(UserError, match="neither a label nor an attribute"):
        m.attribute(to="Smiling")


def test_train_from_python_returns_the_run_its_results_and_its_model(tmp_path):
    done = autoenc.train([*FAST, "model.latent_dim=3"], run_dir=tmp_path / "py")
    assert (tmp_path / "py" / "results.json").is_file() and (tmp_path / "py" / ".hydra" / "config.yaml").is_file()
    assert done.results["test/loss"] > 0 and done.model.latent_dim == 3
    with pytest.raises(UserError, match="model.latent_dim=0 is invalid"):
        autoenc.train([*FAST, "model.latent_dim=0"], run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused as the model was built: no run directory, as from the CLI


@pytest.mark.parametrize("override, expected", [
    ("model=nope", "In 'train': Could not find 'model/nope' Available options in 'model': ae contractive denoising "
                   "sparse vae (see `autoenc train --help`)"),
    ("model.latnt_dim=3", "model.latnt_dim is not a setting of model (autoenc.training.module.AutoencoderModule); "
                          "did you mean model.latent_dim?"),
])
def test_train_from_python_refuses_a_config_hydra_cannot_compose_with_the_clis_line(tmp_path, capsys, override, expected):
    from conftest import cli_error

    assert cli_error(capsys, "train", f"hydra.run.dir={tmp_path / 'cli'}", override) == f"autoenc: error: {expected}"
    with pytest.raises(UserError) as refused:
        autoenc.train([override], run_dir=tmp_path / "py")
    assert str(refused.value) == expected and not (tmp_path / "py").exists()
    assert refused.value._render_traceback_() == [f"UserError: {expected}"]  # what IPython shows: the one line


def test_a_missing_or_unreadable_image_is_refused_in_plain_words(model, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for name, why in [("missing.png", "No such file or directory"), ("broken.png", "Unsupported image file")]:
        with pytest.raises(UserError) as refused:
            model.encode(tmp_path / name)
        assert str(refused.value) == f"cannot read image {tmp_path / name}: {why}; give the path of a readable image"


def test_the_attribute_command_writes_its_grid_and_how_far_the_examples_moved(run, tmp_path):
    cli("attribute", f"ckpt={run}", "from=1", "to=7", "strengths=[0,1,2]", "n=4", f"out={tmp_path / 'a.png'}",
        "eval.probe_examples=500")
    found = json.loads((tmp_path / "a.json").read_text())
    assert found["from"] == 1 and found["to"] == 7 and found["strengths"] == [0.0, 1.0, 2.0]
    assert len(found["share_to"]) == 3 and all(0 <= s <= 1 for s in found["share_to"])
    x, y = autoenc.load(run, device="cpu").split("test")
    assert len(found["examples"]) == 4 and all(int(y[i]) == 1 for i in found["examples"])
    assert Image.open(tmp_path / "a.png").size[0] > 4 * 64  # input + 3 strengths, tiles ≥ 64 px
    line = one_line_error(cli("attribute", f"ckpt={run}", "to=Smiling", check=False))
    assert "'Smiling' is neither a label nor an attribute of this data" in line
    line = one_line_error(cli("attribute", f"ckpt={run}", "from=1", "to=1", check=False))
    assert line == ("autoenc: error: from=1 and to=1 name the same group, whose attribute vector is zero; choose two "
                    "different labels or attributes, or leave from= out (all the others)")


def test_using_a_model_imports_no_lightning(run, tmp_path):
    """Loading a model, the model's methods and a command that uses a model (not evaluate, which runs a test
    loop) leave Lightning unimported: it is what made every command wait seconds before it started."""
    import subprocess
    import sys

    probe = ("import sys, autoenc; m = autoenc.load(sys.argv[1], device='cpu'); x, _ = m.split('test'); "
             "m.reconstruct(x[:4]); m.encode(x[:4]); "
             "print(sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    timed = subprocess.run([sys.executable, "-X", "importtime", "-m", "autoenc", "reconstruct", f"ckpt={run}",
                            f"out={tmp_path / 'r.png'}"], capture_output=True, text=True, cwd=tmp_path)
    assert timed.returncode == 0, timed.stderr[-2000:]
    assert (tmp_path / "r.png").is_file() and " lightning" not in timed.stderr
    assert " torchvision" not in timed.stderr  # (pictures are drawn without it)
    bare = subprocess.run([sys.executable, "-c", "import sys, autoenc; print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert bare.stdout.strip() == "False"


def test_pictures_are_laid_out_and_rounded_as_torchvision_does(tmp_path):
    """The grid and PNG writer that spare commands torchvision's import give torchvision's pixels."""
    from PIL import Image
    from torchvision.utils import make_grid as theirs, save_image

    from autoenc.util.pictures import make_grid, save_png

    g = torch.Generator().manual_seed(0)
    for n, channels, nrow, padding, pad in ((7, 3, 3, 2, 1.0), (16, 1, 4, 0, 0.0), (1, 3, 8, 2, 1.0), (5, 3, 8, 1, 0.5)):
        tiles = torch.rand(n, channels, 6, 5, generator=g)
        assert torch.equal(make_grid(tiles, nrow, padding, pad), theirs(tiles, nrow=nrow, padding=padding, pad_value=pad))
    picture = torch.rand(3, 9, 11, generator=g)
    save_png(picture, tmp_path / "ours.png")
    save_image(picture, tmp_path / "theirs.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png")), np.asarray(Image.open(tmp_path / "theirs.png")))
