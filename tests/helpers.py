"""Callbacks the tests add to runs through `+callbacks.<name>._target_=helpers.<Class>`."""

import signal
import time

from lightning.pytorch.callbacks import Callback


class Delay(Callback):
    """Sleeps after every training step: a known cost for the benchmark to find."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args):
        time.sleep(self.seconds)


class CtrlC(Callback):
    """Presses Ctrl-C once, as the user would, after optimizer step `step` (through SafetyNet's handler)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            safety = next(cb for cb in trainer.callbacks if type(cb).__name__ == "SafetyNet")
            safety._ask_to_stop(signal.SIGINT, None)


class KillMidWrite(Callback):
    """From optimizer step `step` on, the next checkpoint write stops halfway and the process is SIGKILLed:
    a kill at the worst moment of a checkpoint write, made certain instead of left to timing."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            import os

            import autoenc.training.callbacks

            def half_then_killed(path, mode="r", *a, **kw):
                f = open(path, mode, *a, **kw)
                if "w" in mode and str(path).endswith(".tmp"):
                    write = f.write

                    def write_half(data):
                        write(bytes(data)[: len(data) // 2])
                        f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)

                    f.write = write_half
                return f

            autoenc.training.callbacks.open = half_then_killed  # the module's `open`, in front of the builtin
