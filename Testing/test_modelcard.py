"""Model card: round trip, fp16 storage, and refusal of tampered, pickled, mismatched or malformed cards."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from logonet import modelcard
from logonet.data.labels import btcv_label_dicts
from logonet.errors import UserError

ARCH = {"name": "logonet", "preset": "T", "in_channels": 1, "out_channels": 3, "kwargs": {}}
PRE = {"spacing": [3.0, 3.0, 3.0], "intensity_window": [-175.0, 250.0], "roi_size": [32, 32, 32]}


def _card(path, dtype=None):
    torch.manual_seed(0)
    net = modelcard.build_network(ARCH)
    out = modelcard.save(path, net, name="tiny", architecture=ARCH, labels=btcv_label_dicts([1, 6]),
                         preprocessing=PRE, training={"epochs": 0}, metrics={"val_dice": {"spleen": 0.5}},
                         dtype=dtype)
    return out, net


def test_round_trip(tmp_path):
    path, net = _card(tmp_path / "card")
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "weights.safetensors"]
    card = modelcard.load(path)
    assert card.label_values == [0, 1, 6] and card.label_names == {1: "spleen", 6: "liver"}
    assert card.spacing == (3.0, 3.0, 3.0) and card.roi_size == (32, 32, 32)
    assert card.meta["format"] == "logonet-model" and len(card.meta["weights_sha256"]) == 64
    loaded = card.build_model()
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert not loaded.training
    # Saving again over the same folder replaces it atomically (no stray temp folders left behind).
    _card(tmp_path / "card")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card"]


def test_fp16_storage_is_widened(tmp_path):
    path, net = _card(tmp_path / "card", dtype=torch.float16)
    state = modelcard.load(path).state_dict()
    key = next(k for k, v in net.state_dict().items() if v.is_floating_point() and v.numel() > 10)
    assert state[key].dtype == torch.float32
    assert torch.allclose(state[key], net.state_dict()[key], atol=1e-2, rtol=1e-3)
    assert not torch.equal(state[key], net.state_dict()[key])  # really went through fp16


def test_tampered_weights_refused(tmp_path):
    path, _ = _card(tmp_path / "card")
    other, _ = _card(tmp_path / "other")
    tensors = modelcard.read_weights(other / "weights.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1  # a changed but perfectly valid safetensors file
    from safetensors.torch import save_file

    save_file(tensors, str(path / "weights.safetensors"))
    card = modelcard.load(path)
    with pytest.raises(UserError, match="modified since the model card was written"):
        card.build_model()


def test_pickled_weights_refused(tmp_path):
    path, net = _card(tmp_path / "card")
    torch.save(net.state_dict(), path / "weights.safetensors")
    with pytest.raises(UserError, match="pickle"):
        modelcard.load(path).build_model()
    (path / "weights.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(UserError, match="not a safetensors file"):
        modelcard.load(path).state_dict()


def test_safetensors_header_length_starting_0x80_is_not_a_pickle(tmp_path):
    """A header of 0x80 + 256k bytes puts 0x80 first (little-endian length): still a valid safetensors file."""
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    for width in range(1, 300):  # pad a name until the header length's low byte is 0x80
        save_file({"x" * width: torch.zeros(1)}, str(path))
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert set(modelcard.read_weights(path)) == {"x" * width}


def test_mismatched_architecture_refused(tmp_path):
    path, _ = _card(tmp_path / "card")
    meta = json.loads((path / "model.json").read_text())
    meta["architecture"]["out_channels"] = 4
    meta["labels"] = btcv_label_dicts([1, 2, 6])
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not match the architecture"):
        modelcard.load(path).build_model()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="something"), "not a logonet model card"),
    (lambda m: m.update(format_version=99), "not supported"),
    (lambda m: m.update(labels=m["labels"][:1]), "expected 2 labels"),
    (lambda m: m["labels"].append(dict(m["labels"][0])) or m["architecture"].update(out_channels=4), "appears twice"),
    (lambda m: m["preprocessing"].update(spacing=[1, 1]), "spacing"),
    (lambda m: m["preprocessing"].update(intensity_window=[5, 1]), "low < high"),
    (lambda m: m["labels"][0].update(color=[300, 0, 0]), "0-255"),
])
def test_malformed_meta_refused(tmp_path, edit, message):
    path, _ = _card(tmp_path / "card")
    meta = json.loads((path / "model.json").read_text())
    edit(meta)
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message):
        modelcard.load(path)


def test_missing_and_resolve(tmp_path):
    with pytest.raises(UserError, match="not found"):
        modelcard.load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="not found"):
        modelcard.resolve("no-such-bundled-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model card"):
        modelcard.load(tmp_path / "empty")
    path, _ = _card(tmp_path / "run" / "best")
    assert modelcard.resolve(tmp_path / "run") == path  # a training output folder -> its best model
    (path / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        modelcard.load(path)
    shutil.rmtree(path)


def test_bundled_demo_card_is_valid():
    path = modelcard.resolve("demo")
    card = modelcard.load(path)
    assert (path / "REPRODUCE.md").is_file()
    assert card.weights_path.stat().st_size < 20 * 1024 * 1024
    from logonet.nets import available_models

    assert len(card.labels) == card.out_channels - 1 and card.architecture["name"] in available_models()
    assert card.spacing == (3.0, 3.0, 3.0) and len(card.labels) == 12
    card.build_model()  # hash, format and shapes all check out


# ------------------------------------------------------------------------------------------- card schema
def test_card_schema_imports_without_torch_numpy_or_monai():
    """The Slicer modules read cards in Slicer's own process through logonet.cardschema: it must stay light."""
    import subprocess
    import sys

    code = ("import sys, logonet.cardschema as s; heavy = [m for m in ('torch', 'numpy', 'monai', 'SimpleITK') "
            "if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_modelcard_reads_cards_through_the_schema_module():
    """One schema: modelcard uses cardschema's validation, resolution and constants (no second copy)."""
    from logonet import cardschema

    assert modelcard.validate_meta is cardschema.validate_meta and modelcard.resolve is cardschema.resolve
    assert modelcard.META == cardschema.META and modelcard.BUNDLED_DIR == cardschema.BUNDLED_DIR


def test_a_run_folder_with_only_last_resolves_to_last(tmp_path):
    """A run stopped before its first validation has only last/: the command line takes it (best/ first)."""
    last, _ = _card(tmp_path / "run" / "last")
    assert modelcard.resolve(tmp_path / "run") == last
    assert modelcard.load_model(tmp_path / "run").path == last
    best, _ = _card(tmp_path / "run" / "best")
    assert modelcard.resolve(tmp_path / "run") == best
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="not a model card.*best/ or last/"):
        modelcard.load_model(tmp_path / "other")
