"""metrics.jsonl and TensorBoard event files tell the same history, resumes included."""
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from jpeft.train.metrics import MetricsLog


def events(board_dir):
    """Every Event in a directory of event files (TFRecord framing: length, its crc, data, data crc)."""
    for name in sorted(os.listdir(board_dir)):
        with open(os.path.join(board_dir, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            yield event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4


def scalars(board_dir) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a directory of event files."""
    return [(e.step, v.tag, v.simple_value) for e in events(board_dir) for v in e.summary.value]


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
    assert (4, "loss", 40.0) in scalars(tmp_path / "tensorboard")
    # the resumed writer records where its history restarts, so TensorBoard hides steps 4 and 5 of the first run
    purges = [e.step for e in events(tmp_path / "tensorboard")
              if e.session_log.status == event_pb2.SessionLog.START]
    assert purges == [4]


def test_a_run_restarted_before_its_first_checkpoint_purges_the_board(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, 0)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    log = MetricsLog(path, 0)  # killed before any checkpoint: the re-run starts at step 0 again
    log.write({"step": 1, "loss": 10.0})
    log.close()
    with open(path) as f:
        assert [json.loads(line) for line in f] == [{"step": 1, "loss": 10.0}]
    purges = [e.step for e in events(tmp_path / "tensorboard") if e.session_log.status == event_pb2.SessionLog.START]
    assert purges == [1]


def test_fresh_run_writes_no_purge(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), 0)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert not [e for e in events(tmp_path / "tensorboard") if e.session_log.status == event_pb2.SessionLog.START]


def test_disabled_writes_nothing(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), 0, enabled=False)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert os.listdir(tmp_path) == []


def test_resume_survives_a_line_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    log = MetricsLog(str(path), 2)
    log.write({"step": 3, "loss": 3.0})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
