"""Orbax checkpoints of the fine-tuning state: periodic, best-by-validation, any mesh on restore.

Layout of a checkpoint directory:

    <dir>/steps/<step>/{state, meta}   the latest `keep` checkpoints (every N steps, epoch ends)
    <dir>/best/<step>/{state, meta}    the epoch with the lowest validation loss so far

`state` is the train state flattened to `{path: array}` (paths as `jax.tree_util.keystr`), so a
checkpoint is readable without the model class, and restoring reads each array straight into the
shardings of whatever mesh the restoring run uses. `meta` (JSON) holds the model's parameter
signature (paths, shapes, dtypes), the run's settings and the loss history, so that a resumed run
continues exactly and a checkpoint of another model or run is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _flat(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def tree_signature(tree: Any) -> dict[str, Any]:
    """Paths, shapes and dtypes of a pytree's arrays, plus a short digest of them."""
    entries = {
        k: [list(np.shape(x)), str(getattr(x, "dtype", np.asarray(x).dtype))]
        for k, x in _flat(tree).items()
    }
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
    return {"digest": digest, "arrays": entries}


def _describe_mismatch(want: dict[str, Any], got: dict[str, Any]) -> str:
    wa, ga = want["arrays"], got["arrays"]
    missing = sorted(set(wa) - set(ga))
    extra = sorted(set(ga) - set(wa))
    changed = sorted(k for k in set(wa) & set(ga) if wa[k] != ga[k])
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if extra:
        parts.append(f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for k in changed[:3]:
        parts.append(f"{k}: checkpoint {ga[k]} vs model {wa[k]}")
    return "; ".join(parts)


class TrainCheckpointer:
    """Periodic and best-by-validation checkpoints of a `TrainState` with orbax.

    Saves are asynchronous; `wait()` blocks until they are on disk and `close()` waits too.
    """

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint path {self.directory} exists and is not a directory")
        self._steps = ocp.CheckpointManager(
            self.directory / "steps",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self._best = ocp.CheckpointManager(
            self.directory / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                best_fn=lambda m: m["valid_loss"],
                best_mode="min",
            ),
        )

    def latest_step(self) -> int | None:
        """The newest step saved under `steps/` (None if none)."""
        return self._steps.latest_step()

    def best_step(self) -> int | None:
        """The step of the best checkpoint (None if none)."""
        return self._best.best_step()

    @staticmethod
    def _args(state: Any, meta: dict[str, Any]) -> ocp.args.Composite:
        return ocp.args.Composite(
            state=ocp.args.PyTreeSave(_flat(state)),
            meta=ocp.args.JsonSave(meta),
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves `state` and `meta` (JSON-serialisable) as step `step` (asynchronously)."""
        if step in self._steps.all_steps():  # a rerun after a kill between two saves
            self._steps.delete(step)
        self._steps.save(step, args=self._args(state, meta), force=True)

    def save_best(self, step: int, state: Any, meta: dict[str, Any], valid_loss: float) -> None:
        """Saves under `best/`; orbax keeps only the lowest `valid_loss`."""
        if step in self._best.all_steps():
            self._best.delete(step)
        self._best.save(
            step, args=self._args(state, meta), metrics={"valid_loss": valid_loss}, force=True
        )

    def restore(
        self,
        step: int,
        template: Any,
        shardings: Any,
        *,
        expect: dict[str, Any] | None = None,
        best: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """Restores a checkpoint onto the given shardings (any mesh shape).

        Args:
          step: step to restore.
          template: a pytree with the state's structure (arrays or ShapeDtypeStructs).
          shardings: matching pytree of `NamedSharding`s (the restoring run's mesh).
          expect: if given, `meta["model"]` must equal `expect["model"]` (same parameters) and
            the run settings (`train_blocks`, `config`, `seed`) must match.
          best: read from `best/` instead of `steps/`.

        Returns:
          (state with `template`'s structure, meta dict).

        Raises:
          ValueError: the checkpoint is unreadable / corrupt, or belongs to another model or run.
        """
        manager = self._best if best else self._steps
        where = self.directory / ("best" if best else "steps") / str(step)
        meta = self._meta(manager, step, where)
        if expect is not None:
            self._check_model(meta, expect, where)
            for k in ("train_blocks", "config", "seed"):
                if k in expect and meta.get(k) != expect[k]:
                    raise ValueError(
                        f"checkpoint {where} belongs to another run: {k} is {meta.get(k)} there "
                        f"but {expect[k]} now; use a fresh checkpoint_dir"
                    )
        return self._restore_tree(manager, step, where, template, shardings, prefix=""), meta

    def restore_params(
        self,
        step: int,
        template: Any,
        shardings: Any,
        *,
        expect: dict[str, Any] | None = None,
        best: bool = False,
    ) -> Any:
        """Restores only the parameters (`TrainState.params`) of a checkpoint.

        Args:
          template / shardings: pytrees of the parameters alone (e.g. the model's nnx.Param
            state and its shardings).
          expect: if given, `expect["model"]` must match the checkpoint's model signature.
        """
        manager = self._best if best else self._steps
        where = self.directory / ("best" if best else "steps") / str(step)
        meta = self._meta(manager, step, where)
        if expect is not None:
            self._check_model(meta, expect, where)
        return self._restore_tree(manager, step, where, template, shardings, prefix=".params")

    @staticmethod
    def _meta(manager: ocp.CheckpointManager, step: int, where: pathlib.Path) -> dict[str, Any]:
        try:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            meta = manager.restore(step, args=args)["meta"]
        except Exception as e:  # noqa: BLE001 -- orbax raises many kinds; report one clearly
            raise ValueError(f"checkpoint {where} is corrupt or unreadable: {e}") from e
        if not isinstance(meta, dict) or "model" not in meta:
            raise ValueError(f"checkpoint {where} has no model signature in its metadata")
        return meta

    @staticmethod
    def _check_model(meta: dict[str, Any], expect: dict[str, Any], where: pathlib.Path) -> None:
        if meta["model"].get("digest") != expect["model"]["digest"]:
            raise ValueError(
                f"checkpoint {where} was written for another model: "
                f"{_describe_mismatch(expect['model'], meta['model'])}"
            )

    @staticmethod
    def _restore_tree(
        manager: ocp.CheckpointManager,
        step: int,
        where: pathlib.Path,
        template: Any,
        shardings: Any,
        *,
        prefix: str,
    ) -> Any:
        flat_t = _flat(template)
        flat_s = _flat(shardings)
        abstract = {
            prefix + k: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=flat_s[k])
            for k, x in flat_t.items()
        }
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        abstract,
                        restore_args=jax.tree.map(
                            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract
                        ),
                        partial_restore=True,
                    )
                ),
            )["state"]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"checkpoint {where} is corrupt or unreadable: {e}") from e
        missing = [k for k in abstract if k not in restored]
        if missing:
            raise ValueError(f"checkpoint {where} lacks arrays {missing[:3]}")
        leaves = [restored[prefix + k] for k in flat_t]
        return jax.tree.unflatten(jax.tree.structure(template), leaves)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._steps.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the managers."""
        self._steps.close()
        self._best.close()
