import logging

import pytest
import yaml

from jpeft.config import RunConfig, config_to_dict, load_config
from jpeft.errors import ConfigError

GOOD = """
model:
  path: models/tiny
  dtype: bfloat16
method:
  name: lora
  rank: 4
  targets: [q_proj, k_proj, v_proj]
data:
  train: train.jsonl
  prompt: "Summarize:\\n{dialogue}\\n"
  target: "{summary}"
train:
  steps: 20
  lr: 2e-4      # YAML 1.1 reads this as a string; float fields accept it
  alpha_is_not_here: 1
out_dir: runs/x
"""


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def good(tmp_path):
    return write(tmp_path, GOOD.replace("  alpha_is_not_here: 1\n", ""))


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.method.targets is None and cfg.train.lr == 2e-4  # None: the method's own default targets


def test_yaml_then_overrides(tmp_path):
    cfg = load_config(good(tmp_path), ["train.lr=1e-4", "method.targets=q_proj,v_proj",
                                       "train.batch_size=2", "method.alpha=32",
                                       "data.prompt=Q: {dialogue} A:", "out_dir=runs/y"])
    assert cfg.model.path == "models/tiny" and cfg.model.dtype == "bfloat16"
    assert cfg.method.rank == 4 and cfg.method.targets == ["q_proj", "v_proj"]
    assert cfg.method.alpha == 32.0 and isinstance(cfg.method.alpha, float)
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 20 and cfg.train.batch_size == 2
    assert cfg.data.prompt == "Q: {dialogue} A:"  # string fields take the override text verbatim
    assert cfg.out_dir == "runs/y"
    assert load_config(good(tmp_path), ["method.targets=[o_proj]"]).method.targets == ["o_proj"]
    assert load_config(good(tmp_path)).data.prompt == "Summarize:\n{dialogue}\n"
    assert load_config(None, ["model.path=null"]).model.path is None
    with pytest.raises(ConfigError, match="'out_dir' in override 'out_dir=null' must be a string"):
        load_config(None, ["out_dir=null"])  # null as in YAML, never a directory named "null"
    mapping = load_config(None, ["method.rank_pattern={k_proj: 2}", "data.columns={text: dialogue}"])
    assert mapping.method.rank_pattern == {"k_proj": 2} and mapping.data.columns == {"text": "dialogue"}


def test_config_to_dict_round_trips(tmp_path):
    cfg = load_config(good(tmp_path), ["train.seed=3"])
    saved = write(tmp_path, yaml.safe_dump(config_to_dict(cfg)), "saved.yaml")
    assert load_config(saved) == cfg


def test_unknown_key_names_file_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD))
    assert "unknown config key 'train.alpha_is_not_here' in" in str(e.value)
    assert "cfg.yaml" in str(e.value) and "valid keys in 'train': steps" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' in override "
                                          r"'train.lrr=1'; did you mean 'train.lr'\?"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"'trian.lr'.*did you mean 'train.lr'\?"):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"'trian' in .*did you mean 'train'\? valid top-level"):
        load_config(write(tmp_path, "trian:\n  lr: 1\n"))
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["train=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", r"'train.steps' in override 'train.steps=abc' must be an integer, got str 'abc'"),
    ("train.steps=1.5", r"'train.steps'.* must be an integer, got float"),
    ("train.lr=fast", r"'train.lr'.* must be a number"),
    ("method.targets=[1, 2]", r"'method.targets'.* must be a list of strings"),
    ("method.name=prompt & method.tasks=2", r"'method.tasks'.* =2: a run of jpeft train trains one prompt"),
    ("method.name=adalora", r"'method.name'.* must be one of full, lora, qlora, vera, loha, lokr, oft, hra, ia3, road, "
                            r"trainable_tokens, bitfit, norm, prompt, p_tuning, prefix, llama_adapter, bottleneck, "
                            r"classifier, got 'adalora'"),
    ("model.dtype=fp16", r"must be one of auto, float32, bfloat16"),
    ("train.steps=0", r"'train.steps'.* must be positive"),
    ("train.lr=nan", r"'train.lr'.* must be a finite number, got nan"),
    ("train.lr=1e400", r"'train.lr'.* must be a finite number, got inf"),
    ("method.alpha=-inf", r"'method.alpha'.* must be a finite number, got -inf"),
    ("train.seed=-1", r"'train.seed'.* must be >= 0"),
    ("out_dir=", r"'out_dir'.* must name the run's directory"),
    ("train.batch_size=-1", r"'train.batch_size'.* must be positive"),
    ("train.seq_len=0", r"'train.seq_len'.* must be positive"),
    ("train.seq_len=1", r"'train.seq_len'.* must be at least 2"),
    (f"out_dir={__file__}", r"'out_dir'.* is the file .*test_config.py, not a directory"),
    ("train.grad_accum=0", r"'train.grad_accum'.* must be positive"),
    ("method.dropout=1", r"'method.dropout'.* must be in \[0, 1\)"),
    ("method.targets=[a", r"cannot parse the value of override"),
    ("train.fsdp=2", r"'train.fsdp' in override 'train.fsdp=2' has moved to 'mesh.fsdp'"),
    ("train.tensor=2", r"has moved to 'mesh.tensor'"),
    ("mesh.fsdp=0", r"'mesh.fsdp'.* must be a positive number of devices or -1"),
    ("train.on_nonfinite=ignore", r"must be one of stop, skip"),
    ("method.name=qlora & method.expert_quant=fp8",
     r"'method.expert_quant'.* must be one of nf4, int8, mxfp4, got 'fp8'"),
    ("dist.coordinator=localhost:1234", r"'dist.coordinator'.* needs dist.num_processes and dist.process_id"),
    ("dist.process_id=1", r"'dist.process_id'.* needs dist.coordinator"),
    ("train.keep_checkpoints=0", r"'train.keep_checkpoints'.* must be positive"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split(" & "))


def test_type_errors_in_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.batch_size' in .*cfg.yaml must be an integer"):
        load_config(write(tmp_path, "train:\n  batch_size: eight\n"))
    with pytest.raises(ConfigError, match=r"'model.path' in .*must be a string \(quote it"):
        load_config(write(tmp_path, "model:\n  path: 123\n"))
    with pytest.raises(ConfigError, match="section 'train' .* must be a mapping"):
        load_config(write(tmp_path, "train: 5\n"))


def test_a_key_written_twice_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section would silently drop the first's lr."""
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3.*'train' appears twice"):
        load_config(write(tmp_path, "train:\n  lr: 0.5\ntrain:\n  steps: 2\n"))
    with pytest.raises(ConfigError, match=r"'lr' appears twice"):
        load_config(write(tmp_path, "train: {lr: 0.5, lr: 0.1}\n"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="cfg.yaml' is not valid YAML at line 3.*started at line 2"):
        load_config(write(tmp_path, "train:\n  steps: [1, 2\n"))
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")) == RunConfig()


def test_mesh_and_dist_rules():
    with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
        load_config(None, ["mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match=r"'dist.process_id'.* must be in \[0, dist.num_processes=2\), got 2"):
        load_config(None, ["dist.coordinator=10.0.0.1:1234", "dist.num_processes=2", "dist.process_id=2"])
    for coordinator in ("10.0.0.1:port", ":1234", "10.0.0.1"):
        with pytest.raises(ConfigError, match=r"'dist.coordinator'.* must be host:port of process 0"):
            load_config(None, [f"dist.coordinator={coordinator}", "dist.num_processes=2", "dist.process_id=1"])
    cfg = load_config(None, ["mesh.data=2", "mesh.tensor=-1", "dist.coordinator=10.0.0.1:1234",
                             "dist.num_processes=2", "dist.process_id=1"])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.dist.process_id) == (2, 1, -1, 1)


def test_data_needs_exactly_one_template_kind():
    base = ["data.train=t.jsonl"]
    assert load_config(None, base + ["data.text={dialogue}"]).data.text == "{dialogue}"
    with pytest.raises(ConfigError, match="'data.train'.*needs templates"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="'data.target'.* is required"):
        load_config(None, base + ["data.prompt={dialogue}"])
    with pytest.raises(ConfigError, match="'data.text'.*not both"):
        load_config(None, base + ["data.prompt={a}", "data.target={b}", "data.text={a}"])


def test_evaluation_keys_without_anything_to_evaluate_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="jpeft.config"):
        load_config(None, ["data.train=a.jsonl", "data.text=text", "train.eval_every=5"])
    assert "train.eval_every set, but the run has nothing to evaluate" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jpeft.config"):
        load_config(None, ["data.train=a.jsonl", "data.eval=b.jsonl", "data.text=text", "train.eval_every=5"])
        load_config(None, ["data.train=a.jsonl", "data.text=text"])  # defaults alone say nothing
    assert "nothing to evaluate" not in caplog.text
