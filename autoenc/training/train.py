"""`train(cfg)`: the driver, compose → build → fit → test → results.json; importable without the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("autoenc")

from autoenc.model.bottlenecks import Stochastic
from autoenc.training.callbacks import StoredConfig
from autoenc.util.errors import UserError
from autoenc.util.paths import PIPELINE
from autoenc.training.rundir import begin
from autoenc.training.runs import build, check_range, configure_lightning, load_checkpoint, make_trainer, restore, write_json


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains, tests the best checkpoint, writes results.json: its best val score and test metrics."""
    import lightning.pytorch as pl

    configure_lightning()
    out, ckpt_path = Path(cfg.paths.output_dir), cfg.ckpt_path
    if cfg.get("resume") and not ckpt_path:  # resume=true: continue the run in this directory, if any
        if (out / "results.json").is_file():
            log.info(f"{out} has finished already (results.json): nothing to resume")
            return json.loads((out / "results.json").read_text())
        if (out / "checkpoints" / "last.ckpt").is_file():
            ckpt_path = str(out / "checkpoints" / "last.ckpt")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model, built = build(cfg)
    if not len(datamodule.splits["train"][0]):
        raise UserError("the training split is empty (data.classes, data.val_fraction or the data itself leave "
                        "no example to train on); nothing was trained")
    check_range(datamodule, model.autoencoder.likelihood)
    if not len(datamodule.splits["val"][0]):
        log.warning("no validation split (data.val_fraction=0): no best.ckpt is chosen and the test uses the "
                    "final weights (last.ckpt)")
    trainer = make_trainer(built, StoredConfig(built, model.autoencoder.shape))
    if ckpt_path:
        restore(model, load_checkpoint(ckpt_path), ckpt_path)  # a clear error before Lightning reads it
    begin(out, built)  # accepted: from here the run writes into its directory
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    ckpt = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor), None)  # the best-by-val/loss one
    best = ckpt.best_model_path if ckpt else ""
    # The tested checkpoint's monitored score (best val/loss): what `-m` searches optimize.
    results = {ckpt.monitor: float(ckpt.best_model_score)} if best and ckpt.best_model_score is not None else {}
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
    results |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/") and v.numel() == 1}
    tested = len(datamodule.splits["test"][0])
    if "test/nll_iwae" in results and model.iwae_examples is not None and model.iwae_examples < tested:
        scored = model.iwae_scored * trainer.world_size
        results["test/nll_iwae_examples"] = float(scored)
        log.info(f"test/nll_iwae: K = {model.iwae_samples} importance samples on the first {scored:,} of the "
                 f"{tested:,} test examples (eval.iwae_examples); autoenc evaluate scores all of them")
    if trainer.is_global_zero:
        write_json(out / "results.json", results)
        from autoenc.training.loggers import log_run

        log_run(trainer.loggers, hparams_of(built), built, results)
        print(json.dumps(results, indent=2, sort_keys=True))
        print(where_things_are(out.resolve(), model.autoencoder, best))
    return results


def where_things_are(out: Path, autoencoder, best: str) -> str:
    """The run's closing lines: where its pictures, checkpoints and logs are, and the commands that use it."""
    pictures = sorted(p.name for p in out.glob("*.png"))
    images = len(autoencoder.shape) == 3
    use = ["evaluate", "reconstruct" if images else "encode"] + (["sample"] if isinstance(autoencoder.bottleneck, Stochastic) else [])
    return "\n".join([
        f"run directory: {out}",
        f"  pictures:    {', '.join(pictures) if pictures else 'none (vector data)'}",
        f"  checkpoints: checkpoints/{Path(best).name if best else 'last.ckpt'} (tested); checkpoints/last.ckpt, to "
        "continue training: autoenc train ckpt_path=<it> trainer.max_epochs=<more>",
        f"  TensorBoard: tensorboard --logdir {out}",
        *(f"  {'next:' if i == 0 else '':<13}autoenc {c} ckpt={out}" for i, c in enumerate(use)),
    ])


def hparams_of(cfg: DictConfig) -> dict:
    """The choices and numbers that tell runs apart, flattened for TensorBoard's HParams view."""
    from hydra.core.hydra_config import HydraConfig

    flat, groups = {}, PIPELINE
    if HydraConfig.initialized():  # the pipeline's choices (not logger, callbacks…: they tell no model apart)
        choices = HydraConfig.get().runtime.choices
        flat.update({f"choice/{k}": str(choices[k]) for k in (*groups, "experiment") if choices.get(k) is not None})
    for group in groups:
        node = OmegaConf.to_container(cfg[group], resolve=True) if cfg.get(group) else {}
        for k, v in (node or {}).items():
            if isinstance(v, (int, float, str, bool)) and not k.startswith("_"):
                flat[f"{group}.{k}"] = v
    return flat
