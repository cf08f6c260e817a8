"""metrics.jsonl and TensorBoard event files tell the same history, resumes included."""
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from jpeft.train.metrics import MetricsLog


def scalars(board_dir) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a directory of event files (TFRecord framing)."""
    out = []
    for name in sorted(os.listdir(board_dir)):
        with open(os.path.join(board_dir, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
            i += 12 + n + 4
    return out


def test_records_go_to_jsonl_and_tensorboard(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), 0)
    records = [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 2.0, "lr": 1e-3, "eval_rougeL": 0.25,
                                                        "stopped": "SIGTERM"}]
    for r in records:
        log.write(r)
    log.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == records
    got = {(step, tag): value for step, tag, value in scalars(tmp_path / "tensorboard")}
    expected = {(r["step"], k): v for r in records for k, v in r.items() if k not in ("step", "stopped")}
    assert got == pytest.approx(expected, rel=1e-7)  # event files hold float32


def test_resume_drops_lines_past_the_checkpoint_and_purges_the_board(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, 0)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    log.close()
    log = MetricsLog(path, 3)
    log.write({"step": 4, "loss": 40.0})
    log.close()
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    events = scalars(tmp_path / "tensorboard")
    assert (4, "loss", 40.0) in events
    # the resumed writer records where its history restarts, so TensorBoard hides steps 4 and 5 of the first run
    purges = []
    for name in sorted(os.listdir(tmp_path / "tensorboard")):
        with open(tmp_path / "tensorboard" / name, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            if event.session_log.status == event_pb2.SessionLog.START:
                purges.append(event.step)
            i += 12 + n + 4
    assert purges == [4]


def test_disabled_writes_nothing(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), 0, enabled=False)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert os.listdir(tmp_path) == []
