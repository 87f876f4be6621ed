"""The training API's shared part (``logonet.train.session``): one declaration of the shared options with each
command's defaults, arguments -> typed configs, the checks made before any data is read, the architecture from
the registry, and the command recorded in the cards. No training runs here."""
from __future__ import annotations

import argparse

import pytest

from logonet import cli
from logonet.errors import UserError
from logonet.ssl.pretrain import PretrainConfig
from logonet.train.finetune import FinetuneConfig
from logonet.train.session import TrainingConfig, TrainingSession, config_from_args, describe_call

SHARED = ["out", "model", "preset", "model_kwargs", "epochs", "roi", "spacing", "window", "samples", "batch", "lr",
          "weight_decay", "warmup", "device", "amp", "workers", "cache", "seed", "name", "resume", "progress"]


def _parse(command: str, *argv: str) -> argparse.Namespace:
    parser, _ = cli.command_parser(command)
    return parser.parse_args(list(argv))


def test_shared_options_are_declared_once_with_each_commands_defaults() -> None:
    finetune = _parse("finetune", "D", "--out", "O")
    pretrain = _parse("pretrain", "D", "--out", "O")
    for name in SHARED:
        assert hasattr(finetune, name) and hasattr(pretrain, name), name
    # the defaults each command had before the options were shared
    assert (finetune.cache, finetune.samples, finetune.roi) == ("memory", 4, [96])
    assert (pretrain.cache, pretrain.samples, pretrain.roi) == ("none", 2, [96])
    assert FinetuneConfig().cache == "memory" and PretrainConfig().cache == "none"
    assert FinetuneConfig().samples == 4 and PretrainConfig().samples == 2


def test_arguments_become_a_typed_config() -> None:
    args = _parse("finetune", "A", "B", "--out", "O", "--model-kwargs", '{"channels": [8, 16]}', "--roi", "64",
                  "--val-fraction", "0", "--repeats", "3", "1", "--no-augment")
    args.command_line = "logonet finetune A B ..."
    config = config_from_args(FinetuneConfig, args, augment="none")
    assert config.data == ["A", "B"] and config.out == "O" and config.roi == [64]
    assert config.model_kwargs == {"channels": [8, 16]} and config.val_fraction == 0.0
    assert config.repeats == [3, 1] and config.augment == "none" and config.command == "logonet finetune A B ..."
    pre = config_from_args(PretrainConfig, _parse("pretrain", "V", "--out", "P", "--phi2", "0", "--clusterers", "3"))
    assert (pre.data, pre.phi2, pre.clusterers, pre.command) == ("V", 0.0, 3, None)
    with pytest.raises(UserError, match="--model-kwargs is not valid JSON"):
        config_from_args(FinetuneConfig, _parse("finetune", "A", "--out", "O", "--model-kwargs", "{oops"))


@pytest.mark.parametrize("options,message", [
    ({"model": "vnet"}, "unknown model 'vnet'"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"roi": [40]}, "multiple of 32"),
    ({"out": ""}, "--out"),
])
def test_bad_shared_options_are_refused_before_the_output_folder_is_made(tmp_path, options, message) -> None:
    config = TrainingConfig(**{"data": "D", "out": str(tmp_path / "run"), **options})
    with pytest.raises(UserError, match=message):
        TrainingSession(config, what="training run", function="f")
    assert not (tmp_path / "run").exists()


def test_architecture_comes_from_the_registry(tmp_path) -> None:
    vit = TrainingSession(FinetuneConfig(out=str(tmp_path / "a"), model="UNETR", preset="T", roi=64,
                                         model_kwargs={"feature_size": 8}), what="training run", function="f")
    assert vit.architecture(3) == {"name": "unetr", "preset": None, "in_channels": 1, "out_channels": 3,
                                   "kwargs": {"feature_size": 8, "img_size": [64, 64, 64]}}
    net = TrainingSession(FinetuneConfig(out=str(tmp_path / "b"), model="logonet", preset="T"),
                          what="training run", function="f")
    assert net.architecture(5, extra=1)["preset"] == "T" and net.architecture(5)["kwargs"] == {}


def test_the_card_records_the_typed_command_line_or_the_call(tmp_path) -> None:
    typed = FinetuneConfig(data=["D"], out=str(tmp_path / "a"), command="logonet finetune D --out a")
    assert TrainingSession(typed, what="training run", function="f").command == "logonet finetune D --out a"
    call = FinetuneConfig(data=["D"], out="O", epochs=3, lr=0.01)
    assert describe_call("logonet.train.finetune.finetune", call) == (
        "logonet.train.finetune.finetune(FinetuneConfig(data=['D'], out='O', epochs=3, lr=0.01))")


@pytest.mark.parametrize("world_size,requested,code", [(1, True, 130), (2, True, 0), (2, False, 130)])
def test_a_requested_stop_under_torchrun_exits_0_a_signal_130(tmp_path, capsys, world_size, requested, code):
    """torchrun calls any non-zero rank exit a failed job; a STOP file is a wish, not a failure. One process keeps
    130 (the Slicer module reads it as "stopped, resumable"), and so does a signal."""
    from logonet.train.distributed import DistContext
    from logonet.train.engine import FitResult

    session = TrainingSession(FinetuneConfig(data=["D"], out=str(tmp_path / "run")), what="training run", function="f")
    session.dist = DistContext(world_size=world_size)
    stopped = FitResult(epochs_done=3, best_value=0.5, best_epoch=3, history=[], interrupted=True, requested=requested)
    assert session.finish(stopped, "best_dice") == code
    assert ("stopped on request after epoch 3; resume with --resume" in capsys.readouterr().out) == (code == 0)
