"""The run's event log: per-step training records and per-generation metrics in `metrics.jsonl`,
and the optional sinks (TensorBoard, Weights & Biases) fed from the same events.

`metrics.jsonl` holds one JSON object per line, appended and flushed one record at a time (a
kill loses at most the line being written; `read_metrics` drops a torn last line). It is a log
kept beside the committed state, not part of it (the manifest does not list it): resuming
rewrites it so that it holds each record once, in the order the work was done.

- `{"kind": "step", "generation": g, "run": r, "epoch": e, "step": s, "loss": ...,
  "learning_rate": ..., "grad_norm": ..., "tokens_per_second" | "images_per_second": ...,
  "time": unix seconds}`: a training step of chain r's fit in generation g. `step` counts the
  optimizer steps of that one fit from 1, `epoch` its epochs from 0; a record is written every
  `logging.every_steps` steps and for the fit's last step; the throughput is over the steps since
  the fit's previous record or validation (its first record includes compilation).
- `{"kind": "eval", "generation", "run", "epoch", "step", "val_loss", ["val_ppl"], "time"}`:
  a validation during a fit (after optimizer step `step`).
- `{"kind": "generation", "generation": g, <metric>: value, ..., "time"}`: the summary row of a
  committed generation (the same values as generations/gen_g.json; `time` is absent on records
  rebuilt from the committed rows when a run resumes).

Keys that do not apply are absent, never null. On resume (`EventLog.open`) records of
generations beyond the resume point and generation records from it on are dropped, and missing
generation records of committed generations are rebuilt from their rows; when a fit starts
(`StepLog.begin`) its records beyond the step it resumes from are dropped. So a run killed and
resumed any number of times holds every step record of its finished work exactly once.

Writers (`EventLog`) exist only on process 0 (`jaxtools.processes.is_primary`); the sinks are
opened by `open_log` from the experiment's `logging:` block.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from tqdm.auto import tqdm

from collapse_jax import config as config_lib
from collapse_jax.jaxtools import processes
from collapse_jax.rundir import fileio

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` in file order (all, or those of one `kind`).

    A torn last line (a writer killed mid-line) is dropped; a missing file gives [].

    Raises:
      CorruptFileError: a line other than the last is not a JSON object (names the line).
    """
    path = pathlib.Path(run_dir) / METRICS_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1  # no newline after it: the writer may have died mid-line
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict):
            if last:
                break
            raise fileio.CorruptFileError(f"{path} line {i + 1} is not a JSON object")
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), default=_plain) + "\n"


def _plain(x: Any) -> Any:
    if hasattr(x, "item") and getattr(x, "size", 1) == 1:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


class Sink(Protocol):
    """Something the events go to besides metrics.jsonl."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def begin_fit(self, generation: int, run: int, resume_step: int) -> None: ...

    def close(self) -> None: ...


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's finite-or-not float values (bools and the identifying fields excepted)."""
    skip = {"kind", "generation", "run", "epoch", "step", "time"}
    return {
        k: float(v)
        for k, v in record.items()
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TensorBoardSink:
    """TensorBoard event files under `<run>/tensorboard/`: one TensorBoard run per fit
    (`gen_00003` or `gen_00003_chain_00001`, tags `train/<key>` and `eval/<key>` against the
    fit's step, so TensorBoard overlays the generations' training curves) and `generations`
    (tag `<metric>` against the generation)."""

    def __init__(self, run_dir: pathlib.Path, start: int):
        try:
            import tensorboardX  # noqa: PLC0415 (the optional `tensorboard` extra)
        except ImportError:
            raise config_lib.MissingExtra(
                "logging.tensorboard needs tensorboardX: pip install 'collapse-jax[tensorboard]'"
            ) from None
        self._new = tensorboardX.SummaryWriter
        self._root = run_dir / TENSORBOARD_DIR
        self._fits: dict[tuple[int, int], Any] = {}
        # A resumed run hides the events it recomputes (TensorBoard's purge_step).
        self._gens = self._new(str(self._root / "generations"), purge_step=start, flush_secs=10)

    @staticmethod
    def fit_name(generation: int, run: int) -> str:
        if generation == BASE_GENERATION:
            return "base"
        return f"gen_{generation:05d}" + (f"_chain_{run:05d}" if run else "")

    def begin_fit(self, generation: int, run: int, resume_step: int) -> None:
        for w in self._fits.values():
            w.close()
        self._fits = {
            (generation, run): self._new(
                str(self._root / self.fit_name(generation, run)),
                purge_step=resume_step + 1,
                flush_secs=10,
            )
        }

    def write(self, record: Mapping[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "generation":
            for k, v in _scalars(record).items():
                self._gens.add_scalar(k, v, int(record["generation"]))
            return
        w = self._fits.get((record.get("generation"), record.get("run")))
        if w is None or kind not in ("step", "eval"):
            return
        prefix = "train" if kind == "step" else "eval"
        for k, v in _scalars(record).items():
            w.add_scalar(f"{prefix}/{k}", v, int(record["step"]), walltime=record.get("time"))

    def close(self) -> None:
        for w in [*self._fits.values(), self._gens]:
            w.close()
        self._fits = {}


class WandbSink:
    """A Weights & Biases run in `<run>/wandb/` (offline by default: `wandb sync` uploads it).
    Step and eval records log `train/<key>` / `eval/<key>` with `generation`, `run` and
    `train/step`; generation records log `generation/<metric>` against `generation`."""

    def __init__(self, run_dir: pathlib.Path, cfg: Any, run_id: str, config: Mapping):
        try:
            import wandb  # noqa: PLC0415 (the optional `wandb` extra)
        except ImportError:
            raise config_lib.MissingExtra(
                "logging.wandb needs wandb: pip install 'collapse-jax[wandb]'"
            ) from None
        (run_dir / WANDB_DIR).mkdir(exist_ok=True)
        self._run = wandb.init(
            project=cfg.project,
            mode=cfg.mode,
            dir=str(run_dir / WANDB_DIR),
            id=run_id,
            resume="allow",
            config=dict(config),
            name=str(config.get("name", run_id)),
            settings=wandb.Settings(console="off", silent=True),
            reinit="create_new",
        )
        self._run.define_metric("generation")
        self._run.define_metric("generation/*", step_metric="generation")
        self._run.define_metric("train/step")
        self._run.define_metric("train/*", step_metric="train/step")
        self._run.define_metric("eval/*", step_metric="train/step")

    def begin_fit(self, generation: int, run: int, resume_step: int) -> None:
        pass

    def write(self, record: Mapping[str, Any]) -> None:
        kind = record.get("kind")
        vals = _scalars(record)
        if kind == "generation":
            vals = {f"generation/{k}": v for k, v in vals.items()}
            self._run.log({"generation": record["generation"], **vals})
        elif kind in ("step", "eval"):
            prefix = "train" if kind == "step" else "eval"
            self._run.log(
                {
                    "generation": record["generation"],
                    "run": record["run"],
                    "train/step": record["step"],
                    **{f"{prefix}/{k}": v for k, v in vals.items()},
                }
            )

    def close(self) -> None:
        self._run.finish()


class EventLog:
    """The event bus of one run directory: appends every record to metrics.jsonl and hands it to
    the sinks. Open it with `open_log`; use `scope` for what one fit reports."""

    def __init__(self, run_dir: pathlib.Path, settings: Any, sinks: Iterable[Sink] = ()):
        self.run_dir = pathlib.Path(run_dir)
        self.settings = settings
        self.sinks = list(sinks)
        self._file = open(self.run_dir / METRICS_NAME, "a")  # noqa: SIM115 (closed by close)

    def emit(self, record: Mapping[str, Any]) -> None:
        """Appends `record` (and flushes it) and passes it to every sink."""
        self._file.write(_line(record))
        self._file.flush()
        for s in self.sinks:
            s.write(record)

    def generation(self, g: int, row: Mapping[str, Any]) -> None:
        """The record of a committed generation (its summary row)."""
        self.emit({"kind": "generation", **row, "generation": g, "time": time.time()})

    def drop(self, keep) -> None:
        """Rewrites metrics.jsonl (atomically) without the records `keep(record)` rejects."""
        records = read_metrics(self.run_dir)
        kept = [r for r in records if keep(r)]
        if len(kept) == len(records) and _complete(self.run_dir / METRICS_NAME):
            return
        self._file.close()
        fileio.atomic_write_text(self.run_dir / METRICS_NAME, "".join(_line(r) for r in kept))
        self._file = open(self.run_dir / METRICS_NAME, "a")  # noqa: SIM115

    def resume(self, start: int, rows: list[Mapping[str, Any]]) -> None:
        """Makes the log agree with a run resuming at generation `start` whose committed
        generations have summary `rows`: drops records of generations beyond `start` and
        generation records from `start` on, and rebuilds missing generation records."""

        def keep(r: Mapping[str, Any]) -> bool:
            g = r.get("generation", -1)
            return g <= start and not (r.get("kind") == "generation" and g >= start)

        self.drop(keep)
        have = {r["generation"] for r in read_metrics(self.run_dir, "generation")}
        for row in rows:
            g = int(row["generation"])
            if g < start and g not in have:
                self.emit({"kind": "generation", **row, "generation": g})

    def scope(self, generation: int, run: int, *, progress: bool) -> StepLog:
        """What the fit (and sampling) of chain `run` in generation `generation` reports to."""
        return StepLog(self, generation, run, self.settings.every_steps, progress)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
        self._file.close()


def _complete(path: pathlib.Path) -> bool:
    """Whether the file is empty or ends with a newline (no torn last line to remove)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


# The `generation` of the step records of a learner's preparatory fit (`AbstractLearner.prepare`:
# the LM's pretrained base), which runs once before generation 0.
BASE_GENERATION = -1


class StepLog:
    """What one fit of chain `run` in generation `generation` reports through: `begin` once it
    knows the optimizer step it starts from and its number of steps, `due(step)` to ask whether
    a step is reported (fetch its scalars only then), `step` and `eval` to report, `advance` to
    move the progress bar, `end` when it stops. `progress` also tells samplers whether to show
    their own bars. Without an event log (`StepLog(None, ...)`) nothing is written."""

    def __init__(self, log: EventLog | None, generation: int, run: int, every: int, progress: bool):
        self._log = log
        self.generation, self.run = generation, run
        self.every_steps = every
        self.progress = progress
        self.total_steps = 0
        self._last: tuple[int, float] = (0, time.perf_counter())
        self._bar: Any = None

    def begin(self, resume_step: int, total_steps: int, desc: str = "train") -> None:
        """The fit runs optimizer steps resume_step + 1 .. total_steps (resume_step 0: from
        scratch): its records of later steps (left by a killed run) are dropped."""
        self.total_steps = total_steps
        self._last = (resume_step, time.perf_counter())
        if self.progress:
            label = f"{desc} gen {self.generation}" + (f" chain {self.run}" if self.run else "")
            if self.generation == BASE_GENERATION:
                label = "pretrain base"
            self._bar = tqdm(
                total=total_steps,
                initial=resume_step,
                desc=label,
                unit="step",
                leave=False,
            )
        if self._log is None:
            return
        g, r = self.generation, self.run

        def keep(rec: Mapping[str, Any]) -> bool:
            return not (
                rec.get("kind") in ("step", "eval")
                and rec.get("generation") == g
                and rec.get("run") == r
                and rec.get("step", 0) > resume_step
            )

        self._log.drop(keep)
        for s in self._log.sinks:
            s.begin_fit(g, r, resume_step)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is reported: every `every_steps` steps and
        the fit's last step (never without an event log)."""
        return self._log is not None and (step % self.every_steps == 0 or step == self.total_steps)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def step(
        self,
        *,
        epoch: int,
        step: int,
        loss: float,
        learning_rate: float,
        grad_norm: float,
        units: tuple[str, float],
    ) -> None:
        """Reports optimizer step `step`; `units` is ("tokens" | "images", per step), which
        gives the throughput since the previous report."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)
        if self._log is None:
            return
        now = time.perf_counter()
        s0, t0 = self._last
        self._last = (step, now)
        name, per_step = units
        rec = {
            "kind": "step",
            "generation": self.generation,
            "run": self.run,
            "epoch": epoch,
            "step": step,
            "loss": float(loss),
            "learning_rate": float(learning_rate),
            "grad_norm": float(grad_norm),
        }
        if now > t0 and step > s0:
            rec[f"{name}_per_second"] = (step - s0) * per_step / (now - t0)
        rec["time"] = time.time()
        self._log.emit(rec)

    def eval(self, *, epoch: int, step: int, **values: float) -> None:
        """Reports a validation after optimizer step `step` (e.g. val_loss=..., val_ppl=...);
        the next step record's throughput counts from here (it leaves the validation out)."""
        if self._log is None:
            return
        self._last = (step, time.perf_counter())
        self._log.emit(
            {
                "kind": "eval",
                "generation": self.generation,
                "run": self.run,
                "epoch": epoch,
                "step": step,
                **{k: float(v) for k, v in values.items()},
                "time": time.time(),
            }
        )


def show_progress(setting: Any, requested: bool = True) -> bool:
    """Whether progress bars show: `requested` (False: the CLI's --no-progress) and the
    `logging.progress` setting (True, False or "auto": when stderr is a terminal)."""
    if not requested or setting is False:
        return False
    if setting is True:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def open_log(
    run_dir: pathlib.Path, cfg: Any, start: int, rows: list[Mapping[str, Any]], run_id: str
) -> EventLog | None:
    """The event log of a run directory prepared to resume at generation `start` (with the
    committed summary `rows`), with the sinks `cfg.logging` turns on; None on processes other
    than 0 (only process 0 writes)."""
    if not processes.is_primary():
        return None
    settings = cfg.logging
    sinks: list[Sink] = []
    try:
        if settings.tensorboard:
            sinks.append(TensorBoardSink(run_dir, start))
        if settings.wandb.enabled:
            wanted = config_lib.to_dict(cfg, expand=False)
            sinks.append(WandbSink(run_dir, settings.wandb, run_id, wanted))
    except BaseException:
        for s in sinks:
            s.close()
        raise
    log = EventLog(run_dir, settings, sinks)
    try:
        log.resume(start, rows)
    except BaseException:
        log.close()
        raise
    return log
