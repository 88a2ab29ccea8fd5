import sys

from collapse_jax.cli import main

sys.exit(main())
