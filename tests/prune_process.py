"""`aptp prune` in a process of its own (plain, or started by `accelerate launch`), optionally stopped:

    python tests/prune_process.py [--interrupt-at STEP | --kill-in-write N | --kill-in-swap N] prune PRUNE-ARGS

--interrupt-at STEP   Ctrl-C (SIGINT) to this process during step STEP: the step finishes, a checkpoint is written,
                      the run stops with exit code 2.
--kill-in-write N     SIGKILL in the middle of the N-th checkpoint write (half of the optimizer file written).
--kill-in-swap N      SIGKILL in the N-th checkpoint swap, after the previous checkpoint became ``.old`` and before
                      the new one took its name.
"""

import os
import pathlib
import signal
import sys

from aptp.cli import main
from aptp.training import checkpoint as checkpoint_module
from aptp.training import prune as prune_module


def stop_at_step(step_to_stop: int) -> None:
    original = prune_module.prune_step

    def step(config, state, step):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
        return original(config, state, step)

    prune_module.prune_step = step


def kill_in_write(nth: int) -> None:
    original, calls = checkpoint_module.save_file, {"n": 0}

    def save_file(tensors, path, *args, **kwargs):
        if pathlib.Path(path).name == "optimizer.safetensors":
            calls["n"] += 1
            if calls["n"] == nth:
                original(tensors, path, *args, **kwargs)
                size = os.path.getsize(path)
                os.truncate(path, size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(tensors, path, *args, **kwargs)

    checkpoint_module.save_file = save_file


def kill_in_swap(nth: int) -> None:
    original, calls = pathlib.Path.rename, {"n": 0}

    def rename(self, target):
        result = original(self, target)
        if str(target).endswith("checkpoint.old"):
            calls["n"] += 1
            if calls["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    pathlib.Path.rename = rename


if __name__ == "__main__":
    separator = sys.argv.index("prune")
    options, prune_args = sys.argv[1:separator], sys.argv[separator + 1:]
    for flag, value in zip(options[::2], options[1::2]):
        {"--interrupt-at": stop_at_step, "--kill-in-write": kill_in_write, "--kill-in-swap": kill_in_swap}[flag](
            int(value))
    sys.exit(main(["prune", *prune_args]))
