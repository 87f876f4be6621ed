"""logonet postprocess: the per-organ largest-component choice (nnU-Net's rule: keep it where validation Dice
rises), its place in the model card, and segment applying it by default."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from logonet import modelcard
from logonet.cli import main
from logonet.errors import UserError
from logonet.postprocess import choose_largest_component, format_choice


def _rows(dice_by_value):
    return [{"value": v, "name": f"organ{v}", "dice": d} for v, d in dice_by_value.items()]


def test_an_organ_is_chosen_only_where_its_mean_dice_rises():
    cases = [
        {"without": _rows({1: 0.80, 2: 0.50, 3: 0.70}), "with": _rows({1: 0.90, 2: 0.40, 3: 0.70})},
        {"without": _rows({1: 0.60, 2: 0.60, 3: math.nan}), "with": _rows({1: 0.62, 2: 0.61, 3: math.nan})},
    ]
    choice = choose_largest_component(cases, {1: "spleen", 2: "pancreas", 3: "liver"})
    # spleen 0.70 -> 0.76 rises; pancreas 0.55 -> 0.505 falls; liver equal (0.70, the NaN case not counted)
    assert choice["largest_component"] == [1]
    assert choice["val_dice_without"] == {"spleen": 0.7, "pancreas": 0.55, "liver": 0.7}
    assert choice["val_dice_with"]["spleen"] == pytest.approx(0.76)
    assert choice["mean_dice_without"] == pytest.approx((0.7 + 0.55 + 0.7) / 3, abs=1e-4)
    assert choice["mean_dice_chosen"] == pytest.approx((0.76 + 0.55 + 0.7) / 3, abs=1e-4)
    table = format_choice(choice)
    assert "spleen" in table and "largest only" in table.splitlines()[2] and table.splitlines()[3].endswith("all")


def test_the_card_keeps_a_valid_choice_and_refuses_other_values(tiny_card, tmp_path):
    import shutil

    card = shutil.copytree(tiny_card, tmp_path / "card")
    sha = json.loads((card / "model.json").read_text())["weights_sha256"]
    modelcard.update_meta(card, postprocessing={"largest_component": [6], "chosen_on": "val (2 cases)"})
    meta = json.loads((card / "model.json").read_text())
    assert meta["postprocessing"]["largest_component"] == [6] and meta["weights_sha256"] == sha
    assert modelcard.load(card).largest_component_values == [6]
    with pytest.raises(UserError, match="organ values of this card"):
        modelcard.update_meta(card, postprocessing={"largest_component": [2]})  # not one of its labels
    assert modelcard.load(card).largest_component_values == [6]  # a refused update leaves the card as it was
    assert modelcard.load(tiny_card).largest_component_values == []  # no choice: nothing by default


def test_segment_applies_the_cards_choice_unless_told_otherwise(tiny_card, tmp_path, monkeypatch):
    import shutil

    from logonet import infer

    card = shutil.copytree(tiny_card, tmp_path / "card")
    modelcard.update_meta(card, postprocessing={"largest_component": [6]})
    predictor = infer.Predictor(card, device="cpu")
    assert predictor.largest_component_values(None) == [6]
    assert predictor.largest_component_values(True) == [1, 6]
    assert predictor.largest_component_values(False) == []

    # Two separate blobs of each organ (boxes at fixed fractions of the window grid, far apart).
    boxes = {1: [(0.1, 0.3, 0.6, 0.9, 0.1, 0.4), (0.7, 0.8, 0.1, 0.2, 0.7, 0.8)],
             2: [(0.1, 0.4, 0.1, 0.4, 0.5, 0.9), (0.7, 0.8, 0.7, 0.8, 0.1, 0.2)]}  # channel 2 = liver (6)

    def fake_logits(self, x):
        shape = tuple(x.shape[2:])
        scores = torch.zeros((1, 3) + shape)
        scores[0, 0] = 1.0
        for channel, blobs in boxes.items():
            for box in blobs:
                region = tuple(slice(int(box[2 * a] * shape[a]), int(box[2 * a + 1] * shape[a])) for a in range(3))
                scores[(0, channel) + region] = 5.0
        return scores

    monkeypatch.setattr(infer.Predictor, "logits", fake_logits)
    array = np.zeros((32, 32, 32), dtype=np.int16)
    array[0, 0, 0] = -1000  # some air: a CT in HU
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((3.0, 3.0, 3.0))

    def components(largest_component):
        out = sitk.GetArrayFromImage(predictor.predict(image, largest_component=largest_component)[0])
        from scipy import ndimage

        return {v: ndimage.label(out == v, structure=np.ones((3, 3, 3)))[1] for v in (1, 6)}

    assert components(False) == {1: 2, 6: 2}
    assert components(None) == {1: 2, 6: 1}  # the card names the liver (6) only
    assert components(True) == {1: 1, 6: 1}


def test_cli_chooses_on_validation_folders_and_writes_the_card(tiny_card, make_phantom_dataset, tmp_path, capsys):
    import shutil

    card = shutil.copytree(tiny_card, tmp_path / "card")
    val = make_phantom_dataset(cases=2, size=32, seed=3)
    before = (card / "model.json").read_text()
    assert main(["postprocess", str(card), "--val-data", str(val), "--device", "cpu", "--engine", "torch",
                 "--dry-run", "--progress", "none"]) == 0
    assert "dry run" in capsys.readouterr().out and (card / "model.json").read_text() == before
    assert main(["postprocess", str(card), "--val-data", str(val), "--device", "cpu", "--engine", "torch",
                 "--progress", "none"]) == 0
    out = capsys.readouterr().out
    post = json.loads((card / "model.json").read_text())["postprocessing"]
    assert post["chosen_on"] == f"{val.name} (2 validation cases)"
    assert set(post["val_dice_without"]) == {"spleen", "liver"} and set(post["largest_component"]) <= {1, 6}
    assert "mean Dice" in out and "written to" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["postprocess", str(card), "--val-data", str(empty), "--progress", "none"]) == 2
