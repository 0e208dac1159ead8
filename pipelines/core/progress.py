"""Training progress on the driver: step/total, loss, images/s and time left while `fit()` blocks.

Rank 0 of `flowar train` and `flowar vae train` logs `loss` and `images_per_s` to the run's MLflow
metrics every `log_every` steps (and at the last step). The driver sits in `trainer.fit()`, so a
daemon thread (`ProgressFollower`) follows those metrics instead: it works wherever the driver
can reach the tracking store, on a laptop or on a cluster, with nothing added to the workers.

One cheap query per poll (`get_run`: the latest value and step of each metric); the histories
are read only when more than one logged step arrived since the last poll. The first look shows
only the latest step (a resumed run's earlier attempts are not replayed). Rendering
(`ProgressRenderer`) is separate and pure, fed with `ProgressRecord`s:

- on a terminal: one tqdm bar, `train:  12%|#2   | 120/1000, loss 0.4312 312 img/s eta 4m10s`;
- otherwise (a log file): one plain line per logged step, no carriage returns,
  `train: step 120/1000 (12%) loss 0.4312 312 img/s eta 4m10s`.

Nothing is printed while nothing new arrives.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass
from typing import IO, Iterable

__all__ = ["ProgressRecord", "ProgressRenderer", "ProgressFollower", "follow", "eta_seconds",
           "format_duration", "format_line"]


@dataclass(frozen=True)
class ProgressRecord:
    step: int  # optimizer steps done
    total: int | None = None  # steps of the whole run, when known
    loss: float | None = None
    images_per_s: float | None = None
    timestamp_ms: int | None = None  # when rank 0 logged it (for a rate without images_per_s)


def format_duration(seconds: float) -> str:
    """4m10s, 1h02m, 35s, 2d03h."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def eta_seconds(record: ProgressRecord, images_per_step: float | None,
                previous: ProgressRecord | None = None) -> float | None:
    """Seconds left: steps left at rank 0's measured images/s (images_per_step images a step);
    without those, at the step rate between two logged records. None when it cannot be known."""
    if record.total is None:
        return None
    left = max(record.total - record.step, 0)
    if left == 0:
        return 0.0
    if images_per_step and record.images_per_s and record.images_per_s > 0:
        return left * images_per_step / record.images_per_s
    if (previous is not None and previous.timestamp_ms is not None
            and record.timestamp_ms is not None and record.step > previous.step
            and record.timestamp_ms > previous.timestamp_ms):
        per_step = (record.timestamp_ms - previous.timestamp_ms) / 1000 / (record.step - previous.step)
        return left * per_step
    return None


def _postfix(record: ProgressRecord, eta: float | None) -> str:
    parts = []
    if record.loss is not None:
        parts.append(f"loss {record.loss:.4f}" if math.isfinite(record.loss) else f"loss {record.loss}")
    if record.images_per_s is not None:
        parts.append(f"{record.images_per_s:.0f} img/s")
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return " ".join(parts)


def format_line(record: ProgressRecord, eta: float | None, desc: str = "train") -> str:
    """`train: step 120/1000 (12%) loss 0.4312 312 img/s eta 4m10s` (no newline)."""
    if record.total:
        where = f"step {record.step}/{record.total} ({100 * record.step // record.total}%)"
    else:
        where = f"step {record.step}"
    rest = _postfix(record, eta)
    return f"{desc}: {where}" + (f" {rest}" if rest else "")


class ProgressRenderer:
    """Shows records: a tqdm bar on a terminal, else one plain line per record."""

    def __init__(self, stream: IO[str] | None = None, *, tty: bool | None = None,
                 desc: str = "train", images_per_step: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.desc, self.images_per_step = desc, images_per_step
        self.last: ProgressRecord | None = None
        self._bar = None

    def show(self, record: ProgressRecord) -> None:
        if self.last is not None and record.step <= self.last.step:
            return  # nothing new: stay quiet
        eta = eta_seconds(record, self.images_per_step, self.last)
        if self.tty:
            self._show_bar(record, eta)
        else:
            self.stream.write(format_line(record, eta, self.desc) + "\n")
            self.stream.flush()
        self.last = record

    def _show_bar(self, record: ProgressRecord, eta: float | None) -> None:
        from tqdm import tqdm

        if self._bar is None:  # first drawn with this record's figures
            self._bar = tqdm(total=record.total, desc=self.desc, unit="step", file=self.stream,
                             dynamic_ncols=True, initial=record.step,
                             postfix=_postfix(record, eta),
                             # tqdm writes the postfix as ", <postfix>"
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}"
                                        "{postfix}" if record.total else
                                        "{desc}: step {n_fmt}{postfix}")
            return
        if record.total and self._bar.total != record.total:
            self._bar.total = record.total
        self._bar.n = record.step
        self._bar.set_postfix_str(_postfix(record, eta), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ProgressFollower(threading.Thread):
    """Daemon thread: polls a run's MLflow metrics every `interval_s` and shows each new step.

    It ends by itself once a record reaches `total`, or when `stop()` is called (after one last
    poll, so the final logged step is shown). `total`: the run's steps when the driver knows them;
    a `total_steps` metric in the run (flowar train's rank 0 logs one) takes precedence.
    The interval is a display refresh: nothing waits on it but this thread."""

    def __init__(self, tracking_uri: str, run_id: str, *, total: int | None = None,
                 images_per_step: float | None = None, log_every: int = 1,
                 interval_s: float = 3.0, loss_key: str = "loss",
                 rate_key: str = "images_per_s", total_key: str = "total_steps",
                 renderer: ProgressRenderer | None = None, desc: str = "train",
                 stream: IO[str] | None = None, tty: bool | None = None):
        super().__init__(name=f"flowar-progress-{run_id[:8]}", daemon=True)
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.total, self.log_every, self.interval_s = total, max(1, log_every), interval_s
        self.loss_key, self.rate_key, self.total_key = loss_key, rate_key, total_key
        self.renderer = renderer or ProgressRenderer(stream, tty=tty, desc=desc,
                                                     images_per_step=images_per_step)
        self._stop_event = threading.Event()
        self._client = None
        self._looked = False  # the first look shows where the run stands, not its history
        self.error: Exception | None = None  # the last polling error (shown once, then quiet)
        self._warned = False

    # -- thread ---------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                stopping = self._stop_event.is_set()
                self.poll()
                if stopping or self._finished():
                    return
                self._stop_event.wait(self.interval_s)
        finally:
            self.renderer.close()

    def stop(self, timeout_s: float | None = 30.0) -> None:
        """Ask for one last poll and wait for the thread to end."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout_s)

    def _finished(self) -> bool:
        last = self.renderer.last
        return last is not None and last.total is not None and last.step >= last.total

    # -- reading MLflow -------------------------------------------------------------------------
    def poll(self) -> list[ProgressRecord]:
        """Read what is new, show it, and return it (errors are remembered, shown once)."""
        try:
            records = self.read_new()
        except Exception as e:  # noqa: BLE001 - a store hiccup must not end the driver
            self.error = e
            if not self._warned:
                self._warned = True
                print(f"{self.renderer.desc}: progress unavailable for now ({type(e).__name__}: "
                      f"{e})", file=self.renderer.stream, flush=True)
            return []
        for record in records:
            self.renderer.show(record)
        return records

    def read_new(self) -> list[ProgressRecord]:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        run = self._client.get_run(self.run_id)
        latest = {m.key: m for m in run.data.to_proto().metrics}  # latest value and step per key
        first_look, self._looked = not self._looked, True
        loss = latest.get(self.loss_key)
        if loss is None:
            return []
        total = int(latest[self.total_key].value) if self.total_key in latest else self.total
        last = self.renderer.last.step if self.renderer.last is not None else None
        if last is not None and loss.step <= last:
            return []
        # The first look (a resumed run's earlier attempts) and one new point: get_run had it.
        if first_look or (last is not None and loss.step - last <= self.log_every):
            rate = latest.get(self.rate_key)
            return [ProgressRecord(int(loss.step), total, float(loss.value),
                                   float(rate.value) if rate is not None and rate.step == loss.step
                                   else None, int(loss.timestamp))]
        # Several logged steps since the last poll: one line for each, from the histories.
        rates = {m.step: m.value for m in self._client.get_metric_history(self.run_id, self.rate_key)}
        history = sorted(self._client.get_metric_history(self.run_id, self.loss_key),
                         key=lambda m: (m.step, m.timestamp))
        after = -1 if last is None else last
        return _records(((m.step, m.value, m.timestamp) for m in history if m.step > after),
                        rates, total)


def _records(points: Iterable[tuple[int, float, int]], rates: dict, total: int | None):
    by_step: dict[int, ProgressRecord] = {}
    for step, value, ts in points:  # a step logged twice (a restarted worker): keep the latest
        by_step[int(step)] = ProgressRecord(int(step), total, float(value), rates.get(step), int(ts))
    return [by_step[s] for s in sorted(by_step)]


class follow:
    """`with follow(uri, run_id, ...):` runs a ProgressFollower around a blocking call.

    `enabled=False` does nothing (e.g. inside a Tune trial, where Tune reports progress)."""

    def __init__(self, tracking_uri: str, run_id: str, *, enabled: bool = True, **kwargs):
        self.follower = ProgressFollower(tracking_uri, run_id, **kwargs) if enabled else None

    def __enter__(self) -> ProgressFollower | None:
        if self.follower is not None:
            self.follower.start()
        return self.follower

    def __exit__(self, *exc) -> None:
        if self.follower is not None:
            # after a failure, no last poll wait beyond a moment: the error matters more
            self.follower.stop(timeout_s=30.0 if exc[0] is None else 5.0)
