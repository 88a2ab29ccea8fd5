"""`collapse-jax` in a subprocess with the test learners registered (tests that need real
processes: locking, Ctrl-C). Usage: python -m tests.cli_worker run CONFIG ..."""

import sys

from collapse_jax import cli
from collapse_jax import config as config_lib

config_lib.MODEL_REGISTRY["toy"] = ("tests.helpers:ToyConfig", "tests.helpers:ToyGaussianLearner")
config_lib.MODEL_REGISTRY["slowtoy"] = (
    "tests.helpers:SlowToyConfig",
    "tests.helpers:SlowToyLearner",
)

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
