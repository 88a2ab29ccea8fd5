"""The test suite's platform pin (tests/platform_pin.py, applied by tests/conftest.py)."""

from __future__ import annotations

import os

import jax
import pytest

from tests import platform_pin


def test_this_run_is_pinned_to_eight_cpu_devices():
    if os.environ.get(platform_pin.ENV) != "cpu":
        pytest.skip(f"{platform_pin.ENV}={os.environ.get(platform_pin.ENV)!r} lifts the pin")
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    assert jax.default_backend() == "cpu"
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "environ, argv, expected",
    [
        ({}, ["pytest", "-q"], "cpu"),
        ({"JAX_PLATFORMS": "cuda"}, ["pytest"], "cpu"),  # a box-wide setting is overridden
        ({}, ["pytest", "-m", "gpu"], None),
        ({}, ["pytest", "-mgpu", "tests/gpu"], None),
        ({}, ["pytest", "-m", "gpu and not slow"], None),
        ({}, ["pytest", "-m", "not gpu"], "cpu"),
        ({}, ["pytest", "-m", "not  gpu"], "cpu"),
        ({}, ["pytest", "-m", ""], "cpu"),  # `-m ''`: every tier, gpu tests skip on a CPU
        ({}, ["pytest", "-m", "gpu", "-m", "slow"], "cpu"),  # the last -m counts, as in pytest
        ({platform_pin.ENV: "cpu"}, ["pytest", "-m", "gpu"], "cpu"),
        ({platform_pin.ENV: "gpu"}, ["pytest"], "cuda,cpu"),
        ({platform_pin.ENV: "TPU"}, ["pytest"], "tpu,cpu"),
        ({platform_pin.ENV: "auto"}, ["pytest"], None),
    ],
)
def test_the_platform_the_suite_pins(environ, argv, expected):
    assert platform_pin.jax_platforms(environ, argv) == expected


def test_an_unknown_platform_is_one_line_naming_the_variable():
    with pytest.raises(ValueError, match=f"{platform_pin.ENV}='metal': choose from"):
        platform_pin.jax_platforms({platform_pin.ENV: "metal"}, ["pytest"])
