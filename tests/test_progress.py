"""Driver-side progress (pipelines.core.progress): what the renderer prints for synthetic records, and
the follower reading a real MLflow SQLite store that the test itself logs to, as rank 0 would."""

from __future__ import annotations

import io

import pytest

from pipelines.core.progress import (ProgressFollower, ProgressRecord, ProgressRenderer, eta_seconds,
                                format_duration, format_line)


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (35, "35s"), (59.6, "1m00s"), (250, "4m10s"),
                                          (3720, "1h02m"), (90000, "1d01h")])
def test_durations_read_as_hours_minutes_seconds(seconds, text):
    assert format_duration(seconds) == text


def test_eta_from_rank0_images_per_second_or_from_the_step_rate():
    # 880 steps left, 64 images a step at 320 images/s: 176 s
    rec = ProgressRecord(120, 1000, 0.4312, 320.0)
    assert eta_seconds(rec, images_per_step=64) == pytest.approx(176.0)
    # no images/s: the rate between two logged records (100 steps in 50 s), 800 steps left
    a = ProgressRecord(100, 1000, 0.5, None, timestamp_ms=1_000_000)
    b = ProgressRecord(200, 1000, 0.4, None, timestamp_ms=1_050_000)
    assert eta_seconds(b, images_per_step=None, previous=a) == pytest.approx(400.0)
    assert eta_seconds(b, images_per_step=None) is None  # one record and no rate: unknown
    assert eta_seconds(ProgressRecord(1000, 1000, 0.3, 320.0), 64) == 0.0
    assert eta_seconds(ProgressRecord(5, None, 0.3, 320.0), 64) is None  # total unknown


def test_log_file_gets_one_plain_line_per_new_step_and_nothing_else():
    out = io.StringIO()
    r = ProgressRenderer(out, tty=False, desc="train", images_per_step=64)
    for rec in [ProgressRecord(120, 1000, 0.4312, 320.0), ProgressRecord(120, 1000, 0.4312, 320.0),
                ProgressRecord(240, 1000, 0.40119, 256.0), ProgressRecord(200, 1000, 0.5, 300.0),
                ProgressRecord(1000, 1000, 0.3, 256.0)]:
        r.show(rec)
    r.close()
    text = out.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [
        "train: step 120/1000 (12%) loss 0.4312 320 img/s eta 2m56s",
        "train: step 240/1000 (24%) loss 0.4012 256 img/s eta 3m10s",  # 760 * 64 / 256 = 190 s
        "train: step 1000/1000 (100%) loss 0.3000 256 img/s eta 0s",
    ]  # the repeated step and the older one printed nothing
    assert format_line(ProgressRecord(7), None, "vae train") == "vae train: step 7"


def test_terminal_gets_one_live_bar_with_the_same_figures():
    out = io.StringIO()
    r = ProgressRenderer(out, tty=True, desc="train", images_per_step=64)
    r.show(ProgressRecord(120, 1000, 0.4312, 320.0))
    r.show(ProgressRecord(240, 1000, 0.40119, 256.0))
    r.close()
    frames = [f for f in out.getvalue().split("\r") if f.strip()]
    assert len(frames) >= 2 and out.getvalue().count("\n") <= 1  # redrawn in place, not new lines
    assert "120/1000" in frames[0] and "loss 0.4312 320 img/s eta 2m56s" in frames[0]
    assert "24%" in frames[-1] and "240/1000" in frames[-1] and "eta 3m10s" in frames[-1]


def _log(client, run_id, step, loss, images_s=None, key_total=None):
    from mlflow.entities import Metric

    metrics = [Metric("loss", loss, 1_000 * step, step)]
    if images_s is not None:
        metrics.append(Metric("images_per_s", images_s, 1_000 * step, step))
    if key_total is not None:
        metrics.append(Metric("total_steps", key_total, 0, 0))
    client.log_batch(run_id, metrics=metrics)


def test_follower_prints_each_step_rank0_logs_to_mlflow_and_ends_at_the_total(mlflow_uri):
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_uri)
    run_id = c.create_run(c.create_experiment("progress")).info.run_id
    out = io.StringIO()
    f = ProgressFollower(mlflow_uri, run_id, images_per_step=16, log_every=5, interval_s=3600,
                         stream=out, tty=False)
    assert f.poll() == [] and out.getvalue() == ""  # nothing logged yet: quiet
    _log(c, run_id, 5, 0.9, 160.0, key_total=40)
    _log(c, run_id, 10, 0.8, 160.0)
    assert [r.step for r in f.poll()] == [5, 10]  # both logged steps since the last look
    assert f.poll() == []  # nothing new: nothing printed
    for step in range(15, 45, 5):  # six more log points arrive between two polls
        _log(c, run_id, step, 1.0 - step / 50, 160.0)
    f.start()  # polls at once, prints 15..40 from the histories and ends: 40 is the total
    f.join(timeout=120)  # a safety net: the thread ends by itself on the total
    assert not f.is_alive() and f.error is None
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == [f"{s}/40" for s in range(5, 45, 5)]
    assert lines[1] == "train: step 10/40 (25%) loss 0.8000 160 img/s eta 3s"  # 30 * 16 / 160
    assert lines[-1] == "train: step 40/40 (100%) loss 0.2000 160 img/s eta 0s"
    assert "\r" not in out.getvalue()


def test_follower_first_look_at_a_resumed_run_shows_where_it_stands_not_its_history(mlflow_uri):
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_uri)
    run_id = c.create_run(c.create_experiment("progress")).info.run_id
    for step in (5, 10, 15, 20):  # an earlier attempt's log points
        _log(c, run_id, step, 1.0 - step / 50, 160.0, key_total=40 if step == 5 else None)
    out = io.StringIO()
    f = ProgressFollower(mlflow_uri, run_id, images_per_step=16, log_every=5, stream=out, tty=False)
    assert [r.step for r in f.poll()] == [20]
    _log(c, run_id, 25, 0.5, 160.0)
    assert [r.step for r in f.poll()] == [25]
    assert out.getvalue().splitlines() == ["train: step 20/40 (50%) loss 0.6000 160 img/s eta 2s",
                                           "train: step 25/40 (62%) loss 0.5000 160 img/s eta 2s"]


def test_follower_stopped_when_fit_returns_shows_the_last_logged_step(mlflow_uri):
    """The driver stops the follower when fit() returns: one last poll, then the thread ends,
    whatever the total (here the driver's, with no total_steps metric, as in flowar vae train)."""
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_uri)
    run_id = c.create_run(c.create_experiment("progress")).info.run_id
    out = io.StringIO()
    f = ProgressFollower(mlflow_uri, run_id, total=300, log_every=50, interval_s=3600,
                         stream=out, tty=False, desc="vae train")
    f.start()
    _log(c, run_id, 50, 0.25, 96.0)  # one batch, so any poll sees it whole or not at all
    f.stop(timeout_s=120)
    assert not f.is_alive()
    assert out.getvalue() == "vae train: step 50/300 (16%) loss 0.2500 96 img/s\n"  # no eta:
    # images per step unknown to this follower and one record only
