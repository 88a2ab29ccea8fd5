"""Hugging Face hub ids (`facebook/opt-125m`) resolved to local folders through the hub's cache.

`resolve(path)` returns `path` itself when it is a local folder; otherwise, when it looks like a
hub id (`owner/name`, optionally `owner/name@revision`), it returns the snapshot folder of
`huggingface_hub`'s cache (`$HF_HUB_CACHE`, default `~/.cache/huggingface/hub`, layout
`models--owner--name/snapshots/<sha>/` with `refs/<revision>` naming the sha), downloading the
files an OPT model or tokenizer needs when the machine is online. With `HF_HUB_OFFLINE=1` only
the cache is read, and a missing snapshot is an error that says so.

A model downloads one weight format only, the first the repo has of `WEIGHT_FORMATS` (the
order `lm.convert` reads them in): safetensors, else HF Flax's `flax_model.msgpack`, else
`pytorch_model.bin` (facebook/opt-125m's main branch has the last two only, so it fetches the
msgpack: about 250 MB, no torch needed).
"""

from __future__ import annotations

import os
import pathlib
import re

# What the OPT loader reads: the config, then the first weight format the repo has (TF weights
# are never fetched).
MODEL_FILES = ("config.json", "generation_config.json")
WEIGHT_FORMATS = (
    ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors"),
    ("flax_model.msgpack",),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"),
)
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*(@[\w.\-/]+)?")


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether `path` reads as a hub id (`owner/name[@revision]`) rather than a local path."""
    s = str(path)
    return bool(_HUB_ID.fullmatch(s)) and not s.startswith((".", "/", "~"))


def offline() -> bool:
    """`HF_HUB_OFFLINE` as huggingface_hub reads it, at call time (not at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> pathlib.Path:
    """The hub cache, read from the environment at call time (`HF_HUB_CACHE`, else
    `$HF_HOME/hub`, else `~/.cache/huggingface/hub`): huggingface_hub fixes it at import time."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join("~", ".cache", "huggingface")
    return pathlib.Path(home).expanduser() / "hub"


def _split_id(path: str | os.PathLike) -> tuple[str, str | None]:
    """`owner/name[@revision]` -> (repo id, revision or None)."""
    repo_id, _, revision = str(path).partition("@")
    return repo_id, revision or None


def cached_file(path: str | os.PathLike, filename: str) -> pathlib.Path | None:
    """`filename` of a local folder or of a hub id already in the hub cache, never downloading;
    None when it is not at hand (or the cache cannot be read)."""
    local = pathlib.Path(path).expanduser() / filename
    if local.is_file():
        return local
    if not is_hub_id(path):
        return None
    repo_id, revision = _split_id(path)
    try:
        import huggingface_hub

        hit = huggingface_hub.try_to_load_from_cache(
            repo_id, filename, cache_dir=cache_dir(), revision=revision
        )
    except Exception:  # noqa: BLE001 -- a lookup: any cache trouble means "not at hand"
        return None
    return pathlib.Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None


def resolve(path: str | os.PathLike, *, what: str = "model") -> pathlib.Path:
    """A local folder for `path`: itself if it exists, else the hub snapshot of that id.

    Args:
      path: a local folder, or a hub id `owner/name` (optionally `@revision`).
      what: "model" or "tokenizer": which files to fetch from the hub.

    Returns:
      The folder to load from (`path` unchanged when it is no hub id).

    Raises:
      FileNotFoundError: (offline / no network) the hub id is not in the cache; the message
        says what to set.
    """
    local = pathlib.Path(path).expanduser()
    if local.is_dir() or not is_hub_id(path):
        return local  # a local path: the loader reports a missing folder in its own words
    repo_id, revision = _split_id(path)
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise FileNotFoundError(
            f"{what} {path!r} is a hub id; resolving it needs `pip install huggingface_hub`"
        ) from e
    groups = [TOKENIZER_FILES] if what != "model" else [MODEL_FILES + w for w in WEIGHT_FORMATS]
    try:
        for patterns in groups:
            folder = pathlib.Path(
                huggingface_hub.snapshot_download(
                    repo_id,
                    revision=revision,
                    allow_patterns=list(patterns),
                    cache_dir=cache_dir(),
                    local_files_only=offline(),
                )
            )
            # Offline, the snapshot holds what was cached (lm.convert picks among it); online,
            # stop at the first format the repo has.
            if offline() or any(any(folder.glob(p)) for p in patterns[len(MODEL_FILES) :]):
                break
    except Exception as e:  # noqa: BLE001 -- offline/network/missing-repo errors vary by version
        mode = (
            "HF_HUB_OFFLINE=1 and it is not in the hub cache"
            if offline()
            else "it could not be downloaded"
        )
        cache = (
            os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        )
        raise FileNotFoundError(
            f"{what} {path!r}: {mode} ({cache}); download it once online, or give a local "
            f"folder ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    return folder
