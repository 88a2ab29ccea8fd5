"""`generation.keep_params: first_last`: a run directory keeps generation 0's and the newest."""

from collapse_jax import config as config_lib
from collapse_jax import loop


def test_first_last_keeps_generation_0_and_the_newest(tmp_path):
    cfg = config_lib.from_dict(
        {
            "name": "keep",
            "model": {"kind": "gaussian", "dim": 1},
            "generation": {
                "num_generations": 4,
                "samples_per_generation": 10,
                "num_trials": 2,
                "block_size": 1,
                "keep_params": "first_last",
            },
        }
    )
    loop.run_generations(cfg, tmp_path)
    kept = sorted(int(p.name[4:]) for p in (tmp_path / "params").glob("gen_*"))
    assert kept == [0, 3]
