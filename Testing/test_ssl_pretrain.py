"""``logonet pretrain`` end to end on tiny unlabeled phantoms: bad files skipped, loss goes down, the card
initialises fine-tuning of LoGoNet and of a ViT backbone (UNETR), saved pseudo-labels are reused."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from logonet import cli, modelcard
from logonet.events import parse_event_line
from logonet.nets import build_model
from logonet.train.warmstart import init_from_card

# One step per epoch (both volumes, one 32^3 crop each); a high learning rate so two steps show learning.
TINY = ["--clusterers", "3", "--k-min", "4", "--k-max", "8", "--roi", "32", "--features", "16", "--lr", "1e-2",
        "--warmup", "0", "--samples", "1", "--batch", "2", "--device", "cpu", "--progress", "jsonl"]
VIT = ["--model", "unetr", "--feature-size", "8", "--model-kwargs",
       json.dumps({"hidden_size": 96, "mlp_dim": 192, "num_heads": 4})]


def _pretrain(*argv):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["pretrain", *[str(a) for a in argv]])
    events = [e for e in map(parse_event_line, buffer.getvalue().splitlines()) if e]
    return code, events


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two 32^3 unlabeled phantoms, a corrupt file and a 2-D image in one flat folder."""
    from logonet.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("ssl")
    phantoms = write_phantom_dataset(root / "ph", 2, size=32, seed=0, unlabeled=True)
    flat = root / "flat"
    flat.mkdir()
    for path in sorted((phantoms / "imagesTr").glob("*.nii.gz")):
        shutil.copy(path, flat / path.name)
    (flat / "corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a volume" * 8)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(flat / "slice2d.nii.gz"))
    return flat


# One test per pretrain run, so that pytest-xdist never runs the same (costly) pre-training on two workers.
def test_logonet_pretrain_end_to_end(folder, tmp_path, capsys):
    out = tmp_path / "logonet"
    code, events = _pretrain(folder, "--out", out, "--model", "logonet", "--preset", "T", "--epochs", "1", *TINY)
    assert code == 0, events[-3:]
    assert events[-1]["event"] == "done"
    _check_bad_files_reported_and_skipped(events)
    _check_first_loss_is_chance(events, out)
    _check_card_keys(out)
    _check_logonet_finetune_init(out)

    # --resume: scan verdicts and pseudo-labels are reused (no clustering again), no epoch is left to do.
    code, events = _pretrain(folder, "--out", out, "--model", "logonet", "--preset", "T", "--epochs", "1",
                             "--resume", *TINY)
    assert code == 0
    stages = [e.get("stage") for e in events if e["event"] == "stage"]
    assert "pseudolabels" in stages and "cluster_features" not in stages and "clustering" not in stages
    assert not [e for e in events if e["event"] == "epoch"]  # the one epoch was already done

    # The same folder again without --resume is refused rather than overwritten.
    capsys.readouterr()
    code, _ = _pretrain(folder, "--out", out, "--model", "logonet", "--preset", "T", "--epochs", "1", *TINY)
    assert code == 2 and "--resume" in capsys.readouterr().err


def _check_bad_files_reported_and_skipped(events):
    warned = " ".join(e["message"] for e in events if e["event"] == "warning")
    assert "corrupt.nii.gz" in warned and "slice2d.nii.gz" in warned and "2-D" in warned
    assert [e["volumes"] for e in events if e.get("stage") == "pretrain"] == [2]


def _check_first_loss_is_chance(events, out):
    """The zero-initialised head predicts uniformly: the first step's loss is exactly the mean of log K_n."""
    losses = [e["loss"] for e in events if e["event"] == "epoch"]
    ks = modelcard.load_model(out).meta["training"]["head"]["ks"]
    assert len(losses) == 1 and losses[0] == pytest.approx(float(np.mean(np.log(ks))), rel=1e-5)


def _check_card_keys(out):
    """Backbone tensors under build_model's names, head tensors under pretrain_head."""
    card = modelcard.load_model(out)
    assert card.architecture["name"] == "logonet" and card.architecture["out_channels"] == 16
    state = card.state_dict()
    backbone = {k for k in state if not k.startswith("pretrain_head.")}
    assert backbone == set(build_model("logonet", out_channels=16, preset="T").state_dict())
    assert {k for k in state if k.startswith("pretrain_head.")} == {
        "pretrain_head.norm.weight", "pretrain_head.norm.bias", "pretrain_head.proj.weight", "pretrain_head.proj.bias"}
    ks = card.meta["training"]["head"]["ks"]
    assert state["pretrain_head.proj.weight"].shape == (3 * max(ks), 16) and all(4 <= k <= 8 for k in ks)


def _check_logonet_finetune_init(out):
    model = build_model("logonet", out_channels=14, preset="T")
    report = init_from_card(model, str(out))
    assert report.skipped_head == 4 and not report.missing
    assert report.loaded >= 0.9 * report.total
    # Only the layers that depend on the number of classes keep their fresh initialisation.
    assert all(k.startswith(("fusion.", "global_net.head_out", "local")) for k in report.mismatched)
    source = modelcard.load_model(out).state_dict()
    key = next(k for k in model.state_dict() if k.endswith("weight") and "head" not in k)
    assert torch.equal(model.state_dict()[key], source[key])


def test_vit_backbone_pretrains_and_initialises_finetuning(folder, tmp_path):
    out = tmp_path / "unetr"
    code, events = _pretrain(folder, "--out", out, "--epochs", "1", *VIT, *TINY)
    assert code == 0, events[-3:]
    losses = [e["loss"] for e in events if e["event"] == "epoch"]
    assert len(losses) == 1 and np.isfinite(losses[0])
    card = modelcard.load_model(out)
    assert card.architecture["kwargs"]["img_size"] == [32, 32, 32]
    model = modelcard.build_network(dict(card.architecture, out_channels=14))
    report = init_from_card(model, str(out))
    assert report.skipped_head == 4 and report.loaded >= 0.9 * report.total
    assert all(k.startswith("net.out.") for k in report.mismatched)  # only UNETR's final 1x1 conv

    # The command itself: `logonet finetune --init` on labelled phantoms reports what it loaded.
    from logonet.data.phantom import write_phantom_dataset

    labelled = write_phantom_dataset(tmp_path / "lab", 2, size=32, seed=1)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["finetune", str(labelled), "--out", str(tmp_path / "ft"), "--model", "unetr",
                         "--model-kwargs", json.dumps(card.architecture["kwargs"]), "--init", str(out),
                         "--roi", "32", "--epochs", "1", "--samples", "2", "--val-fraction", "0",
                         "--device", "cpu", "--progress", "jsonl"])
    assert code == 0
    init = [e for e in map(parse_event_line, buffer.getvalue().splitlines()) if e and e.get("stage") == "init"]
    assert len(init) == 1 and init[0]["loaded"] == report.loaded


def test_bad_requests_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nrrd").write_bytes(b"NRRD0004\ngarbage")
    for argv, expected in [
        ([empty, "--out", tmp_path / "o1", "--roi", "40"], "multiple of 32"),
        ([empty, "--out", tmp_path / "o2", "--roi", "32"], "holds no volumes"),
        ([bad, "--out", tmp_path / "o3", "--roi", "32"], "none of the 1 files"),
    ]:
        code, _ = _pretrain(*argv, "--device", "cpu")
        assert code == 2
        assert expected in capsys.readouterr().err



def test_pretraining_lowers_the_pseudo_label_loss(folder, tmp_path):
    """The command's own step (pseudo-labels, masking, head, Eq. 4-5) on the phantoms' crops, LoGoNet T: a few
    AdamW steps bring the loss on fixed evaluation masks below the untrained (chance) level."""
    from logonet.data.transforms import PreprocessConfig
    from logonet.nets.pretrain_head import PretrainHead
    from logonet.ssl.masking import MaskingConfig
    from logonet.ssl.pretrain import PretrainNet, make_step, volume_loader
    from logonet.ssl.pseudolabels import ClusterSettings, fit_pseudolabels, volume_crops

    volumes = sorted(str(p) for p in folder.glob("phantom_*.nii.gz"))
    load = volume_loader(PreprocessConfig.preset("ssl", roi_size=(32, 32, 32)))
    labeler = fit_pseudolabels(volumes, tmp_path / "pl", ClusterSettings(clusterers=3, k_min=4, k_max=8,
                                                                          roi=(32, 32, 32), fraction=1.0), load)
    batch = {"image": torch.from_numpy(np.stack([next(volume_crops(load(v), (32, 32, 32))) for v in volumes]))[:, None]}
    torch.manual_seed(0)
    net = PretrainNet(build_model("logonet", out_channels=16, preset="T"), PretrainHead(16, labeler.ks))
    cpu = torch.device("cpu")

    def evaluate():
        step = make_step(labeler, MaskingConfig(), 0.1, generator=torch.Generator().manual_seed(123))
        with torch.no_grad():  # train mode: BatchNorm's running statistics mean little after a few steps
            return float(np.mean([step(net, batch, cpu)[0].item() for _ in range(2)]))

    before = evaluate()
    assert before == pytest.approx(float(np.mean(np.log(labeler.ks))), rel=1e-5)
    train = make_step(labeler, MaskingConfig(), 0.1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(5):
        optimizer.zero_grad()
        train(net, batch, cpu)[0].backward()
        optimizer.step()
    assert evaluate() < before - 0.1
