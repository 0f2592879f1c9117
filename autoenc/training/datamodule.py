"""The Lightning face of a data module: a Trainer needs a LightningDataModule, while loading and using a model
does not, so the data layer's modules are plain objects and this adapter hands their hooks to a Trainer."""

from __future__ import annotations

import lightning.pytorch as pl

_KINDS: dict[type, type] = {}


class LightningData(pl.LightningDataModule):
    """A data module (autoenc.data.module.TensorDataModule) as Lightning sees it: its hooks, its state in
    checkpoints, and every other attribute of it (splits, transform, …) read through."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def __getattr__(self, name):
        data = self.__dict__.get("data")
        if data is None:
            raise AttributeError(name)
        return getattr(data, name)

    @property
    def trainer(self):
        return self.__dict__.get("_trainer")

    @trainer.setter
    def trainer(self, trainer) -> None:
        """The Trainer Lightning attaches is the data's too: its batches follow its epoch, rank and position."""
        self.__dict__["_trainer"] = trainer
        if "data" in self.__dict__:
            self.data.trainer = trainer

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage)

    def teardown(self, stage: str) -> None:
        self.data.teardown(stage)

    def train_dataloader(self):
        return self.data.train_dataloader()

    def val_dataloader(self):
        return self.data.val_dataloader()

    def test_dataloader(self):
        return self.data.test_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        batch = self.data.on_after_batch_transfer(batch, dataloader_idx)
        # in the precision's dtype (a `-true` one's): Lightning converts batches before this hook makes them float
        return batch if self.trainer is None else self.trainer.precision_plugin.convert_input(batch)

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)


def lightning_data(data) -> LightningData:
    """`data` for a Trainer, under its own class's name: checkpoints key a data module's state by its class's
    name, so that a run's checkpoints and the commands reading them agree."""
    if isinstance(data, LightningData):
        return data
    kind = _KINDS.get(type(data))
    if kind is None:
        kind = _KINDS[type(data)] = type(type(data).__name__, (LightningData,), {"__qualname__": type(data).__qualname__})
    return kind(data)
