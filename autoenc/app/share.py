"""Sharing a trained model: a self-describing folder (config.json, model.safetensors, a model card, its
pictures; no pickle) that `autoenc.load` and every command's `ckpt=` read as they read the run, and the
Hugging Face Hub (`hf://owner/name`) through huggingface_hub's own cache, offline mode and token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from autoenc import __version__
from autoenc.model.penalties import Penalty
from autoenc.training.runs import EXPORT_CONFIG, EXPORT_WEIGHTS, Run, load_run
from autoenc.util.errors import UserError

HUB = "hf://"


def export(run: Run, out: Path, license: str = "other") -> Path:
    """Writes the model of `run` into the folder `out`: config.json (the config it was trained with, the shape
    of an example, the autoenc version), model.safetensors (the weights and the data's standardization
    statistics), README.md (a Hugging Face model card) and the run's pictures."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"out={out} exists and is not empty; name a new folder (export never overwrites)")
    from safetensors.torch import save_file

    # clones: tensors that share storage (a tied bias) are stored once per name, as the state dict names them
    tensors = {f"autoencoder.{k}": v.detach().cpu().contiguous().clone() for k, v in run.autoencoder.state_dict().items()}
    tensors |= {f"datamodule.{k}": v.detach().cpu().contiguous().clone()
                for k, v in run.datamodule.state_dict().items()}
    config = OmegaConf.to_container(run.cfg)
    config.get("paths", {}).pop("output_dir", None)  # where it was trained: not the reader's business
    described = {"autoenc": __version__, "shape": list(run.autoencoder.shape), "config": config,
                 "data_module": type(run.datamodule).__qualname__}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / EXPORT_WEIGHTS), metadata={"format": "pt", "library": "autoenc"})
    (out / EXPORT_CONFIG).write_text(json.dumps(described, indent=2, sort_keys=True) + "\n")
    pictures = sorted(run.dir.glob("*.png"))
    for picture in pictures:
        shutil.copy(picture, out / picture.name)
    (out / "README.md").write_text(model_card(run, [p.name for p in pictures], license))
    return out


def model_card(run: Run, pictures: list[str], license: str) -> str:
    """A Hugging Face model card: metadata, what the model is, its data and preprocessing, the command that
    trained it, its results and pictures, and how to use it."""
    cfg, ae = run.cfg, run.autoencoder
    data = str(cfg.data.get("name") or _name(cfg.data))
    overrides = run.dir / ".hydra" / "overrides.yaml"
    command = " ".join(["autoenc train", *(OmegaConf.load(overrides) if overrides.is_file() else [])])
    figures = {}
    for file in ("results.json", "evaluation.json"):
        if (run.dir / file).is_file():
            figures |= json.loads((run.dir / file).read_text())
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(figures.items()) if isinstance(v, (int, float)))
    shape = "×".join(map(str, ae.shape))
    preprocessing = ["values scaled to [0, 1]" if not cfg.data.get("standardize") else
                     "standardized per feature by the training split's mean and deviation (stored with the weights)"]
    if cfg.data.get("binarize"):
        preprocessing.append(f"binarized ({cfg.data.binarize})")
    return "\n".join([
        "---",
        "library_name: autoenc",
        f"license: {license}",
        f"tags: [autoencoder, autoenc, {ae.bottleneck.name}, {_name(cfg.net)}]",
        f"datasets: [{data}]",
        "---",
        "",
        f"# An autoencoder with a {ae.bottleneck.name} bottleneck on {data}",
        "",
        f"Trained with [autoenc](https://pypi.org/project/autoenc/) {__version__}. Inputs: {shape}; code: "
        f"{'×'.join(map(str, ae.code_shape))}; backbone `{_name(cfg.net)}`; likelihood `{type(ae.likelihood).__name__}`; "
        f"noise `{type(ae.noise).__name__ if ae.noise is not None else 'none'}`; penalty `{ae.penalty.name if type(ae.penalty) is not Penalty else 'none'}`"
        + (f"; conditioned on {cfg.model.condition} ({cfg.model.labels})" if cfg.model.get("condition") else "") + ".",
        "",
        "## Data",
        "",
        f"`{data}` (data config `_target_`: `{cfg.data._target_}`), examples of shape {shape}, "
        + "; ".join(preprocessing) + ".",
        "",
        "## Training",
        "",
        "```", command, "```",
        "",
        "## Results",
        "",
        *(["| figure | value |", "|---|---|", rows] if rows else ["No results were recorded with the run."]),
        "",
        *(["## Pictures", "", *[f"![{p[:-4]}]({p})" for p in pictures], ""] if pictures else []),
        "## Use",
        "",
        "```python",
        "import autoenc",
        'model = autoenc.load("hf://OWNER/NAME")   # or the path of this folder',
        *(["codes = model.encode(images, labels=labels)   # a conditional model: each image's "
           + ("class" if cfg.model.condition == "label" else "attribute columns"),
           "new = model.sample(16, " + ("label=3)" if cfg.model.condition == "label" else "attributes=[...])")]
          if cfg.model.get("condition") else ["codes = model.encode(images)"]),
        "```",
        "",
        "Weights in `model.safetensors` (tensors only: loading runs no code); the config in `config.json`.",
        "",
    ])


def _name(node) -> str:
    """A config node's class name (its `_target_`'s last part), `none` for an empty seam."""
    return str(node.get("_target_", "none")).rsplit(".", 1)[-1] if node else "none"


def hub_folder(ref: str) -> Path:
    """The local folder of a Hub model `hf://owner/name[@revision]`, downloaded into (or, offline, found in)
    huggingface_hub's cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, _, revision = ref[len(HUB):].partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None))
    except LocalEntryNotFoundError:
        raise UserError(f"{ref} is not in the Hugging Face cache and the Hub cannot be reached (offline, or "
                        "HF_HUB_OFFLINE=1); connect once to download it, or give a local folder") from None
    except RepositoryNotFoundError:
        raise UserError(f"{ref}: no such model on the Hub, or it is private (log in with `hf auth login` or "
                        "set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"cannot download {ref} from the Hugging Face Hub: {e}") from None


def load_shared(path, iwae_samples: int | None = None, on: str | None = None) -> Run:
    """A run, a checkpoint, an exported folder, or a Hub model `hf://owner/name` (commands writing for a Hub
    model write under ./outputs/hf/owner--name)."""
    if str(path).startswith(HUB):
        name = str(path)[len(HUB):].partition("@")[0].replace("/", "--")
        return load_run(hub_folder(str(path)), iwae_samples, on, run_dir=Path("outputs") / "hf" / name)
    return load_run(path, iwae_samples, on)


def push(folder: Path, repo: str, private: bool = True) -> str:
    """Uploads an exported folder to the Hub repository `repo` (created if needed; private unless `private`
    is false) with huggingface_hub's token; returns the repository's address."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=f"autoenc {__version__} export")
    except HfHubHTTPError as e:
        raise UserError(f"cannot upload to {repo} on the Hugging Face Hub: {e} (log in with `hf auth login` or "
                        "set HF_TOKEN)") from None
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face Hub to upload {repo}: {e}") from None
    return str(url)
