"""``logonet finetune`` on tiny phantoms: it learns, writes model cards + metrics, resumes, refuses to clobber
a run, --init copies weights, and torchrun (2 processes, gloo, CPU) produces the same kind of model card."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from logonet import cli, modelcard
from logonet.train import finetune
from logonet.train.warmstart import init_from_card

BASE = ["--preset", "T", "--spacing", "3", "--device", "cpu", "--progress", "jsonl",
        "--val-fraction", "0", "--no-augment", "--seed", "0"]
# ULKANet-T (LoGoNet's single-extractor sibling) learns in a handful of CPU steps; LoGoNet-T runs under torchrun.
COMMON = BASE + ["--model", "ulkanet", "--roi", "32", "--samples", "4"]


def _events(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _untrained_dice(data: Path, seed: int = 0) -> float:
    """Mean Dice of the freshly initialised network (same seed as the run) with the same validator."""
    from logonet.data.transforms import PreprocessConfig
    from logonet.events import ProgressReporter
    from logonet.nets import build_model

    cases, names = finetune.discover_cases(str(data))
    cfg = PreprocessConfig(spacing=(3.0, 3.0, 3.0), roi_size=(32, 32, 32))
    _, val_tf = finetune.build_transforms(cfg, sorted(names))
    items = [val_tf(dict(c)) for c in cases]
    torch.manual_seed(seed)
    net = build_model("ulkanet", out_channels=len(names) + 1, preset="T").eval()
    validate = finetune.make_validator(items, (32, 32, 32), len(names) + 1, list(names.values()), 0.5, None,
                                       ProgressReporter("none"))
    return validate(net, torch.device("cpu"))["dice"]


@pytest.fixture(scope="module")
def two_organ_data(make_phantom_dataset, tmp_path_factory):
    """Phantoms reduced to spleen (1) and liver (6): big enough to learn in a few CPU steps."""
    import SimpleITK as sitk

    from logonet.data import volumes

    src = make_phantom_dataset(cases=2, size=48, seed=0)
    dst = tmp_path_factory.mktemp("two_organs")
    meta = json.loads((src / "dataset.json").read_text())
    for entry in meta["training"]:
        image = volumes.read_image(src / entry["image"])
        volumes.write_image(image, dst / entry["image"])
        labels = sitk.GetArrayFromImage(volumes.read_image(src / entry["label"]))
        labels[(labels != 1) & (labels != 6)] = 0
        volumes.write_labelmap(labels, image, dst / entry["label"], {1: "spleen", 6: "liver"})
    meta["labels"] = {"0": "background", "1": "spleen", "6": "liver"}
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_finetune_learns_then_resumes(two_organ_data, tmp_path, capsys):
    data = two_organ_data
    out = tmp_path / "run"
    code = cli.main(["finetune", str(data), "--out", str(out), "--epochs", "4", "--repeats", "2", "--lr", "5e-3",
                     "--warmup", "0", "--crop-by", "classes", *COMMON])
    events = _events(capsys.readouterr().out)
    assert code == 0
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["step"] for e in epochs] == [1, 2, 3, 4]
    best = max(e["dice"] for e in epochs)
    untrained = _untrained_dice(data)
    assert best > untrained + 0.3 and best > 2 * untrained, (best, untrained)
    assert events[-1]["event"] == "done" and events[-1]["best_dice"] == pytest.approx(best)
    for kind in ("best", "last"):
        card = modelcard.load(out / kind)
        assert card.out_channels == 3 and card.label_names == {1: "spleen", 6: "liver"}
        assert card.label_values == [0, 1, 6]
        assert card.spacing == (3.0, 3.0, 3.0) and card.roi_size == (32, 32, 32)
        assert card.meta["training"]["augmentation"]["crop_by"] == "classes"
        assert set(card.meta["preprocessing"]) == {"orientation", "spacing", "intensity_window", "roi_size",
                                                  "crop_foreground", "antialias"}  # no runtime or augmentation field
    assert modelcard.load(out / "best").meta["metrics"]["val_mean_dice"] == pytest.approx(best)
    assert modelcard.load(out / "last").meta["training"]["epochs"] == 4
    # The card records the command line as typed (cli.main's argv), not the test runner's sys.argv.
    assert modelcard.load(out / "last").meta["training"]["command"].startswith(
        f"logonet finetune {data} --out {out} --epochs 4 --repeats 2")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 4 and "dice_liver" in rows[0]
    assert (out / "metrics.png").stat().st_size > 1000

    # A second run into the same folder without --resume is refused (nothing overwritten).
    assert cli.main(["finetune", str(data), "--out", str(out), "--epochs", "5", *COMMON]) == 2
    assert "--resume" in capsys.readouterr().err

    # Resume: continues at epoch 5 of 5, keeps the history.
    code = cli.main(["finetune", str(data), "--out", str(out), "--epochs", "5", "--repeats", "2", "--lr", "5e-3",
                     "--warmup", "0", "--resume", *COMMON])
    events = _events(capsys.readouterr().out)
    assert code == 0
    resume = [e for e in events if e["event"] == "stage" and e.get("stage") == "resume"]
    assert resume and resume[0]["epoch"] == 4
    assert [e["step"] for e in events if e["event"] == "epoch"] == [5]
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 5
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 5

    # --init from the trained card: every tensor matches (same architecture and classes).
    from logonet.nets import build_model

    report = init_from_card(build_model("ulkanet", out_channels=3, preset="T"), str(out))
    assert report.loaded == report.total and not report.mismatched


def test_finetune_mixes_folders_with_their_repeats_and_validates_on_val_data(two_organ_data, make_phantom_dataset,
                                                                             tmp_path, capsys):
    """Two DATA folders (e.g. real x3 + synthetic x1): steps per epoch follow the per-folder repeats, the card
    lists both folders' cases, validation runs on --val-data only and is recorded as held out; the default
    augmentation is nnunet."""
    other = make_phantom_dataset(cases=1, size=48, seed=4)
    out = tmp_path / "mix"
    args = [a for a in COMMON if a != "--no-augment"]
    code = cli.main(["finetune", str(two_organ_data), str(other), "--repeats", "3", "1", "--val-data", str(other),
                     "--out", str(out), "--epochs", "1", "--warmup", "0", "--batch", "1", *args])
    events = _events(capsys.readouterr().out)
    assert code == 0, events[-1]
    steps = [e for e in events if e["event"] == "progress" and str(e.get("stage", "")).startswith("epoch")]
    assert steps[-1]["total"] == 2 * 3 + 1 * 1
    card = modelcard.load(out / "last")
    training = card.meta["training"]
    assert training["train_cases"] == [f"{two_organ_data.name}/{c}" for c in ("phantom_000", "phantom_001")] + \
        [f"{other.name}/phantom_000"]
    assert training["val_cases"] == ["phantom_000"] and training["val_data"] == str(other.resolve())
    assert card.meta["metrics"]["val_source"] == "synthetic"  # --val-data is a logonet phantom folder
    assert card.validated_overlap == 0.5  # the validator's --overlap: segment's default for this card
    assert card.meta["training"]["augmentation"]["augment"] == "nnunet"
    # --repeats must give one number, or one per folder.
    assert cli.main(["finetune", str(two_organ_data), str(other), "--repeats", "1", "2", "3",
                     "--out", str(tmp_path / "bad"), *args]) == 2
    assert "one per DATA folder" in capsys.readouterr().err


def test_finetune_bad_arguments(make_phantom_dataset, tmp_path, capsys):
    data = make_phantom_dataset(cases=2, size=32, seed=0)
    assert cli.main(["finetune", str(data), "--out", str(tmp_path / "a"), "--roi", "40", "--model", "logonet", *BASE]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert cli.main(["finetune", str(tmp_path / "none"), "--out", str(tmp_path / "b"), *COMMON]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["finetune", str(data), "--out", str(tmp_path / "c"), "--grad-clip", "-1", *COMMON]) == 2
    assert "--grad-clip must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_val_source_says_whether_validation_is_synthetic_held_out_or_the_training_cases(make_phantom_dataset,
                                                                                        tmp_path):
    """The card's metrics.val_source: "synthetic" for a --val-data folder written by logonet synth/phantom,
    "held_out" for another folder or a split, "training_scan" when validation reuses the training cases."""
    import shutil

    from logonet.train.finetune import FinetuneConfig, gather_cases

    data = make_phantom_dataset(cases=2, size=32, seed=0)
    real = tmp_path / "real"
    shutil.copytree(data, real)
    meta = json.loads((real / "dataset.json").read_text())
    del meta["logonet"]  # no generator: as if it were real CT
    (real / "dataset.json").write_text(json.dumps(meta))

    def source(**options):
        return gather_cases(FinetuneConfig(data=[str(data)], out=str(tmp_path / "o"), **options)).val_source

    assert source(val_data=str(data)) == "synthetic"
    assert source(val_data=str(real)) == "held_out"
    assert source(val_fraction=0.5) == "held_out"
    assert source(val_fraction=0.0) == "training_scan"


def test_split_cases_is_seeded_and_disjoint():
    cases = [{"id": f"c{i}", "image": "i", "label": "l"} for i in range(10)]
    train, val = finetune.split_cases(cases, 0.2, seed=1)
    assert len(val) == 2 and not {c["id"] for c in train} & {c["id"] for c in val}
    assert finetune.split_cases(cases, 0.2, seed=1) == (train, val)
    train, val = finetune.split_cases(cases[:1], 0.2, seed=1)
    assert train == val == cases[:1]  # one case: validate on it


@pytest.mark.slow
def test_torchrun_two_processes_gloo(make_phantom_dataset, tmp_path):
    """Marked slow (CI step): two CPU processes under torchrun, DDP over gloo, rank 0 writes the card."""
    data = make_phantom_dataset(cases=2, size=32, seed=0)
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "logonet", "finetune", str(data),
         "--out", str(out), "--epochs", "1", "--samples", "2", "--roi", "32", "--model", "logonet", *BASE],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    events = _events(result.stdout)
    start = [e for e in events if e["event"] == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2  # only rank 0 reports
    assert [e["step"] for e in events if e["event"] == "epoch"] == [1]
    card = modelcard.load(out / "best")
    assert card.meta["training"]["world_size"] == 2
    card.build_model()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["best", "checkpoint.pt", "last", "metrics.csv", "metrics.png"]


def test_remapped_labels_keep_the_deterministic_steps_cacheable(two_organ_data):
    """Values 1 and 6 become channels 1 and 2 before the crops (class-balanced crops count channels), as one
    more deterministic step that MONAI's caches hold."""
    from monai.transforms import MapLabelValued, Randomizable, Transform

    from logonet.data.transforms import PreprocessConfig, train_transforms

    cfg = PreprocessConfig(spacing=(3.0, 3.0, 3.0), roi_size=(32, 32, 32), num_samples=2, crop_by="classes")
    train_tf, val_tf = finetune.build_transforms(cfg, [1, 6])
    first_random = train_tf.get_index_of_first(lambda t: isinstance(t, Randomizable) or not isinstance(t, Transform))
    plain = train_transforms(cfg.__class__(spacing=cfg.spacing, roi_size=cfg.roi_size))
    assert first_random == plain.get_index_of_first(lambda t: isinstance(t, Randomizable)) + 1
    assert isinstance(train_tf.transforms[first_random - 1], MapLabelValued)
    case = finetune.discover_cases(str(two_organ_data))[0][0]
    assert set(torch.unique(val_tf(dict(case))["label"]).tolist()) == {0, 1, 2}
    assert all(set(torch.unique(crop["label"]).tolist()) <= {0, 1, 2} for crop in train_tf(dict(case)))


def test_same_seed_same_run(make_phantom_dataset, tmp_path):
    """The typed API: --seed fixes weights, crop positions and batch order (two runs log the same losses; another
    seed differs), and the card records the call itself with its non-default fields."""
    from logonet.train.finetune import FinetuneConfig
    from logonet.train.finetune import finetune as run_finetune

    data = make_phantom_dataset(cases=2, size=32, seed=0)
    losses = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        config = FinetuneConfig(data=[str(data)], out=str(tmp_path / name), model="ulkanet", preset="T", roi=[32],
                                samples=4, spacing=[3.0], device="cpu", progress="none", val_fraction=0.0,
                                augment="none", seed=seed, epochs=1, lr=5e-3, cache="none")
        assert run_finetune(config) == 0
        with open(tmp_path / name / "metrics.csv") as handle:
            losses[name] = [row["loss"] for row in csv.DictReader(handle)]
    command = modelcard.load(tmp_path / "c" / "last").meta["training"]["command"]
    assert command.startswith(f"logonet.train.finetune.finetune(FinetuneConfig(data=['{data}'], out='{tmp_path / 'c'}'")
    assert "seed=1" in command and "lr=0.005" in command and "cache='none'" in command and "weight_decay" not in command
    assert losses["a"] == losses["b"] and losses["a"] != losses["c"]
