"""A callback that sleeps after every training step: a known cost for the benchmark to find."""

import time

from lightning.pytorch.callbacks import Callback


class Delay(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args):
        time.sleep(self.seconds)
