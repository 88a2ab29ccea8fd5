"""Language models: the paper's OPT experiment, its families and the known language.

`load_pretrained(path_or_hub_id, dtype=...)` loads any supported family (`lm.families`) and
`save_pretrained(model, path)` writes a folder transformers loads.
"""

__all__ = ["load_pretrained", "save_pretrained"]


def __getattr__(name: str):
    # Resolved on first use (PEP 562), so importing a light submodule (the CLI imports
    # `lm.distributed` for every run) does not import Flax and every model family.
    if name in __all__:
        from collapse_jax.lm import families  # noqa: PLC0415

        return getattr(families, name)
    raise AttributeError(f"module 'collapse_jax.lm' has no attribute {name!r}")
