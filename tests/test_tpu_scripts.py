"""tpu_scripts/: each --dry-run prints exactly the gcloud commands it would run (and runs none)."""
import os
import shlex
import subprocess

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tpu_scripts")
REPO = os.path.dirname(SCRIPTS)
TRAIN = ["jpeft", "train", "configs/llama3_8b_lora_tpu.yaml", "data.prompt=Summarize: {dialogue}", "x=it's"]


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path_factory):
    """A gcloud on PATH that fails loudly, so no test can reach a real cloud account."""
    stub = tmp_path_factory.mktemp("stub") / "gcloud"
    stub.write_text("#!/usr/bin/env bash\necho 'the tests must not run gcloud' >&2\nexit 99\n")
    stub.chmod(0o755)
    global SAFE_ENV
    SAFE_ENV = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"}


def run(script, *args, env=None):
    return subprocess.run(["bash", os.path.join(SCRIPTS, script), *args], capture_output=True, text=True,
                          timeout=60, env=env or SAFE_ENV)


def commands(script, name, *args) -> list[list[str]]:
    result = run(script, name, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def ssh(command: str, *extra) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "z1", "--worker=all", "--command", command,
            *extra]


CREATE = ["gcloud", "compute", "tpus", "queued-resources", "create", "pod-qr", "--node-id", "pod", "--zone", "z1"]
DELETE = ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod-qr", "--zone", "z1", "--force", "--quiet"]
SETUP = [ssh("rm -rf ~/jpeft"),
         ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", REPO, "pod:~/jpeft", "--zone", "z1", "--worker=all"],
         ssh("pip install -U 'jax[tpu]' && pip install -e ~/jpeft")]


@pytest.mark.parametrize("accel, tier, runtime", [("v5litepod-16", "--spot", "v2-alpha-tpuv5-lite"),
                                                  ("v5p-8", "--reserved", "v2-alpha-tpuv5"),
                                                  ("v4-8", None, "tpu-ubuntu2204-base")])
def test_create(accel, tier, runtime):
    args = ["pod", "--zone", "z1", "--type", accel] + ([tier] if tier else [])
    assert commands("create.sh", *args) == [
        CREATE + ["--accelerator-type", accel, "--runtime-version", runtime] + ([tier] if tier else [])]
    assert commands("create.sh", *args, "--version", "custom", "--project", "p")[0][-4:] == (
        ["custom", tier, "--project", "p"] if tier else ["--runtime-version", "custom", "--project", "p"])


def test_setup_delete_copy():
    assert commands("setup.sh", "pod", "--zone", "z1") == SETUP
    assert commands("setup.sh", "pod", "--zone", "z1", "--source", "jpeft==0.1.0") == [  # run.sh runs in ~/jpeft
        ssh("mkdir -p ~/jpeft"), ssh("pip install -U 'jax[tpu]' && pip install jpeft==0.1.0")]
    assert commands("delete.sh", "pod", "--zone", "z1") == [DELETE]
    assert commands("copy.sh", "pod", "--zone", "z1", "--from", "/mnt/runs/x/adapter", "--to", "out") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "pod:/mnt/runs/x/adapter", "out", "--zone", "z1",
         "--worker=0"]]


def test_run_keeps_every_argument_of_the_jpeft_command():
    [command] = commands("run.sh", "pod", "--zone", "z1", "--", *TRAIN)
    assert command[:-1] == ssh("")[:-1]
    remote = command[-1]
    assert remote.startswith("set -o pipefail; mkdir -p ~/jpeft-logs && logs=$(cd ~/jpeft-logs && pwd) && cd ~/jpeft && ")
    words = shlex.split(remote.split("cd ~/jpeft && ", 1)[1])
    assert words[:len(TRAIN)] == TRAIN  # spaces, braces and quotes survive
    assert words[len(TRAIN):] == ["2>&1", "|", "tee", "$logs/$(hostname).log"]


@pytest.mark.parametrize("log_dir, where", [(None, "jpeft-logs"), ("logs", "logs"), ("~/my logs", "my logs")])
def test_the_remote_command_logs_where_asked_and_keeps_the_commands_status(tmp_path, log_dir, where):
    """What a worker runs (from its home): the log lands in D (a relative D under home, ~/ expanded there),
    and the line exits with the command's status, not tee's."""
    (tmp_path / "jpeft").mkdir()
    options = () if log_dir is None else ("--log-dir", log_dir)
    for command, status in ((["true"], 0), (["sh", "-c", "echo trained; exit 3"], 3)):
        [line] = commands("run.sh", "pod", "--zone", "z1", *options, "--", *command)
        done = subprocess.run(["bash", "-c", line[-1]], cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)},
                              capture_output=True, text=True)
        assert done.returncode == status, done.stderr
    [log] = (tmp_path / where).iterdir()
    assert log.read_text() == "trained\n"


def fake_cloud(tmp_path, states, statuses):
    """A gcloud that answers a TPU's `describe` with the next of `states` (a queued resource is ACTIVE at once),
    and each run of the jpeft command with the next of `statuses`; it logs every call."""
    for name, lines in (("states", states), ("statuses", statuses)):
        (tmp_path / name).write_text("".join(f"{x}\n" for x in lines))
    fake = tmp_path / "gcloud"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/calls
next() {{ head -n1 "$1"; sed -i 1d "$1"; }}
case "$*" in
  *"queued-resources describe"*) echo ACTIVE ;;
  *"tpu-vm describe"*) next {tmp_path}/states ;;
  *"jpeft train"*) exit "$(next {tmp_path}/statuses)" ;;
esac
""")
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}:{SAFE_ENV['PATH']}"}


@pytest.mark.parametrize("states, statuses, exit_status, runs, recoveries", [
    (["READY", "READY"], [1], 1, 1, 0),  # a failing command on a healthy TPU: stop, no retry
    (["READY", "READY", "READY", "READY"], [255, 0], 0, 2, 0),  # ssh lost the host: run it again
    (["READY", "PREEMPTED", "PREEMPTED", "READY"], [0, 0], 0, 2, 1),  # preempted (jpeft exits 0): recreate, resume
])
def test_babysit_retries_preemption_only(tmp_path, states, statuses, exit_status, runs, recoveries):
    env = fake_cloud(tmp_path, states, statuses)
    done = run("babysit.sh", "pod", "--zone", "z1", "--type", "v4-8", "--interval", "0", "--", *TRAIN, env=env)
    assert done.returncode == exit_status, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum("jpeft train" in c for c in calls) == runs
    assert sum(c.startswith("compute tpus queued-resources create") for c in calls) == recoveries


def test_babysit_dry_run_is_one_recovery_round():
    got = commands("babysit.sh", "pod", "--zone", "z1", "--type", "v5litepod-16", "--spot", "--", *TRAIN)
    assert got[0] == DELETE
    assert got[1] == CREATE + ["--accelerator-type", "v5litepod-16", "--runtime-version", "v2-alpha-tpuv5-lite",
                               "--spot"]
    assert got[2:5] == SETUP
    assert got[5][:-1] == ssh("")[:-1] and "jpeft train configs/llama3_8b_lora_tpu.yaml" in got[5][-1]
    assert len(got) == 6


@pytest.mark.parametrize("script, args, message", [
    ("create.sh", ["pod", "--zone", "z1", "--type", "v5p-8", "--spot", "--reserved"], "exclude each other"),
    ("create.sh", ["pod", "--type", "v5p-8"], "--zone is required"),
    ("run.sh", ["pod", "--zone", "z1"], "give the command to run after --"),
    ("delete.sh", ["--zone", "z1"], "missing the TPU name"),
    ("delete.sh", ["pod", "--zone", "z1", "--typo", "x"], "unknown option --typo"),
    ("copy.sh", ["pod", "--zone", "z1", "--from", "x"], "--to is required"),
    ("setup.sh", ["pod", "--zone"], "--zone needs a value"),
])
def test_usage_errors(script, args, message):
    result = run(script, "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


@pytest.mark.parametrize("script", ["create.sh", "setup.sh", "run.sh", "babysit.sh", "copy.sh", "delete.sh"])
def test_help(script):
    result = run(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}")


def test_without_dry_run_the_same_command_runs(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "gcloud"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {calls}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{SAFE_ENV['PATH']}"}
    result = run("delete.sh", "pod", "--zone", "z1", "--project", "p", env=env)
    assert result.returncode == 0, result.stderr
    assert ["gcloud", *calls.read_text().splitlines()] == DELETE + ["--project", "p"]
    assert result.stdout == "" and "+ gcloud compute tpus queued-resources delete" in result.stderr
