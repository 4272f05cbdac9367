"""Run configuration: YAML files, --set overrides, and refusals that name the key."""

from __future__ import annotations

import pytest

import softprompt as sp
from softprompt.training.config import RunConfig, apply_sets, load_yaml


def test_yaml_and_sets_layer_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: smollm2-135m\nmethod: p-tuning\ntrain:\n  lr: 0.003\n  steps: 50\nprompt:\n  encoder: mlp\n")
    cfg = RunConfig()
    load_yaml(path, cfg)
    apply_sets(cfg, ["train.steps=70", "task.pool=mean", "template=[P:2] {text} [MASK]", "train.patience=null"])
    cfg.validate()
    assert (cfg.model, cfg.method, cfg.train.lr, cfg.train.steps) == ("smollm2-135m", "p-tuning", 0.003, 70)
    assert cfg.prompt == {"encoder": "mlp"} and cfg.task_options == {"pool": "mean"}
    assert cfg.template == "[P:2] {text} [MASK]" and cfg.train.patience is None


def test_yaml_1_1_words_stay_words_in_sets():
    """`--set train.mixed_precision=no` means the setting "no", not YAML 1.1's False;
    true/false are still booleans."""
    cfg = RunConfig()
    apply_sets(cfg, ["train.mixed_precision=no", "train.progress=false", "task.pool=on"])
    cfg.validate()
    assert cfg.train.mixed_precision == "no" and cfg.train.progress is False and cfg.task_options == {"pool": "on"}


@pytest.mark.parametrize("assignment,match", [
    ("train.lrr=0.1", r"unknown key 'train.lrr'; did you mean 'train.lr'"),
    ("modle=minilm", r"unknown key 'modle'; did you mean 'model'"),
    ("train.steps", "expected key=value"),
])
def test_unknown_keys_are_named_with_a_suggestion(assignment, match):
    with pytest.raises(sp.ConfigError, match=match):
        apply_sets(RunConfig(), [assignment])


def test_unknown_prompt_field_suggests(tmp_path):
    cfg = RunConfig(method="p-tuning")
    apply_sets(cfg, ["prompt.encodr=mlp"])
    with pytest.raises(sp.ConfigError, match=r"unknown key 'prompt.encodr' for p-tuning; did you mean 'prompt.encoder'"):
        cfg.validate()


def test_bad_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: minilm\ntrain:\n  lr: [0.1\n")
    with pytest.raises(sp.ConfigError, match=r"run.yaml: invalid YAML at line \d+, column \d+"):
        load_yaml(path, RunConfig())


def test_unknown_method_lists_known():
    cfg = RunConfig(method="lora")
    with pytest.raises(sp.ConfigError, match="unknown method 'lora'; known: .*p-tuning-v2"):
        cfg.validate()


def test_method_aliases():
    cfg = RunConfig(method="p_tuning_v2")
    cfg.validate()
    assert cfg.method == "p-tuning-v2"


@pytest.mark.parametrize("value,expected", [("true", True), ("false", False), ("reduce-overhead", "reduce-overhead"),
                                            ("default", "default"), ("auto", "auto")])
def test_compile_setting_takes_a_switch_or_a_mode(value, expected):
    cfg = RunConfig()
    apply_sets(cfg, [f"train.compile={value}", "train.gradient_checkpointing=true"])
    cfg.validate()
    assert cfg.train.compile == expected and cfg.train.gradient_checkpointing is True


def test_compile_is_auto_by_default_compiled_on_one_gpu_only(caplog):
    """train.compile defaults to auto: compiled on one CUDA device (measured 1.35-1.63x at
    1B on an H100), eager on a CPU, under several processes and for a tensor-parallel base,
    each said in one log line; an explicit setting is kept as it is."""
    import logging

    import torch

    from softprompt.training.fast_path import resolved_compile

    assert RunConfig().train.compile == "auto"
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="softprompt.train"):
        assert resolved_compile("auto", cuda) is True
        assert resolved_compile("auto", cpu) is False
        assert resolved_compile("auto", cuda, processes=2) is False
        assert resolved_compile("auto", cuda, tensor_parallel=True) is False
        assert resolved_compile("auto", cuda, causal=False) is False
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 5 and "compiled" in said[0] and "eager on the CPU" in said[1]
    assert "eager on 2 processes" in said[2] and "eager on a tensor-parallel base" in said[3]
    assert "eager on an encoder or encoder-decoder" in said[4]
    for setting in (True, False, "reduce-overhead"):
        assert resolved_compile(setting, cpu) == setting


def test_the_processes_of_a_launch_are_read_before_accelerate_starts(monkeypatch):
    """``train.compile=auto`` is decided before accelerate's `Accelerator` exists: the
    processes come from the launcher's environment (torchrun / accelerate: WORLD_SIZE;
    mpirun: OMPI_COMM_WORLD_SIZE), 1 without a launcher or with a value that is no count."""
    from softprompt.training.fast_path import launched_processes

    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launched_processes() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_processes() == 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_processes() == 2  # torchrun's own variable first
    monkeypatch.setenv("WORLD_SIZE", "")
    assert launched_processes() == 4
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    assert launched_processes() == 1


def test_device_and_dtype_settings():
    import torch

    from softprompt.errors import ConfigError
    from softprompt.base_models import resolve_device, training_dtype

    cfg = RunConfig()
    apply_sets(cfg, ["device=cpu", "dtype=bfloat16"])
    cfg.validate()
    assert (cfg.device, cfg.dtype) == ("cpu", "bfloat16")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert training_dtype("auto", torch.device("cpu")) is None  # the checkpoint's own dtype
    assert training_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ConfigError, match="dtype must be one of"):
        RunConfig(dtype="half").validate()
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda:0': no such CUDA device on this machine"):
            resolve_device("cuda:0")


def test_yaml_files_keep_yes_no_on_off_as_words(tmp_path):
    """A run file's `mixed_precision: no` is the setting "no" (YAML 1.1 would read False)."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\n  bucket: false\n  progress: True\ntask:\n  pool: on\n")
    cfg = RunConfig()
    load_yaml(path, cfg)
    cfg.validate()
    assert cfg.train.mixed_precision == "no" and cfg.train.bucket is False and cfg.train.progress is True
    assert cfg.task_options == {"pool": "on"}
