"""`collapse-jax` in a subprocess with the test learners registered (tests that need real
processes: locking, Ctrl-C). Usage: python -m tests.cli_worker run CONFIG ..."""

import sys

from collapse_jax import cli
from collapse_jax import config as config_lib
from tests.helpers import TOY_KINDS

config_lib.MODEL_REGISTRY.update(TOY_KINDS)

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
