"""`collapse-jax` in a subprocess that kills itself (SIGKILL) at the N-th `os.replace`, before or
after the rename: what a kill -9, a power cut or the OOM killer leaves at that point.
Usage: python -m tests.kill_worker N before|after run CONFIG ...
"""

import os
import signal
import sys

from collapse_jax import cli
from collapse_jax import config as config_lib
from tests.helpers import TOY_KINDS

config_lib.MODEL_REGISTRY.update(TOY_KINDS)


def _install(n: int, when: str) -> None:
    real = os.replace
    count = [0]

    def replace(src, dst, *args, **kwargs):
        count[0] += 1
        if count[0] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *args, **kwargs)
        if count[0] == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


if __name__ == "__main__":
    _install(int(sys.argv[1]), sys.argv[2])
    sys.exit(cli.main(sys.argv[3:]))
