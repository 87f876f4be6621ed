"""``logonet segment`` / Predictor: exact output geometry (NIfTI, NRRD, DICOM), the jsonl progress schema,
ROI, stats, batch mode, largest component, bad inputs (clear error, nothing written), CUDA OOM fallbacks."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from logonet import cli, infer, modelcard
from logonet.data import volumes
from logonet.data.labels import btcv_label_dicts
from logonet.data.phantom import make_phantom, phantom_image
from logonet.errors import UserError
from logonet.events import ProgressReporter

EVENTS = {"start", "stage", "progress", "epoch", "checkpoint", "warning", "done", "error"}


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    """A tiny LoGoNet-T card whose final bias makes it predict 'liver' everywhere (deterministic output)."""
    torch.manual_seed(0)
    arch = {"name": "logonet", "preset": "T", "in_channels": 1, "out_channels": 3, "kwargs": {}}
    net = modelcard.build_network(arch)
    state = net.state_dict()
    last_bias = [k for k in state if k.endswith("bias") and state[k].shape == (3,)][-1]
    state[last_bias] = torch.tensor([0.0, -50.0, 50.0])  # channel 2 = liver wins
    return modelcard.save(tmp_path_factory.mktemp("card") / "tiny", state, name="tiny", architecture=arch,
                          labels=btcv_label_dicts([1, 6]),
                          preprocessing={"spacing": [3.0, 3.0, 3.0], "intensity_window": [-175.0, 250.0],
                                         "roi_size": [32, 32, 32]})


@pytest.fixture(scope="module")
def volume():
    hu, _ = make_phantom(size=32, seed=0)
    image = phantom_image(hu, spacing=(1.5, 1.7, 2.1))
    image.SetOrigin((12.5, -40.25, 101.0))
    # An oblique, left-handed-free rotation: catches any axis/affine mix-up.
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return image


def _write_dicom(image, folder):
    folder.mkdir(parents=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        for tag, value in [("0008|0060", "CT"), ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"),
                           ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.2"),
                           ("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{z + 1}"),
                           ("0020|0037", "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z)))),
                           ("0020|0013", str(z + 1)), ("0018|0050", f"{image.GetSpacing()[2]:.6f}"),
                           ("0028|1052", "0"), ("0028|1053", "1")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)
    return folder


def _segment(args, capsys):
    code = cli.main(["segment", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", ["nii.gz", "nrrd", "dicom"])
def test_output_geometry_equals_input(tmp_path, card, volume, kind, capsys):
    if kind == "dicom":
        src = _write_dicom(volume, tmp_path / "series")
    else:
        src = volumes.write_image(volume, tmp_path / f"ct.{kind}")
    reference = volumes.read_image(src)
    out = tmp_path / f"seg.{'nii.gz' if kind == 'dicom' else kind}"
    code, _, err = _segment([src, out, "--model", card, "--device", "cpu", "--progress", "none"], capsys)
    assert code == 0, err
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize() == reference.GetSize()
    if kind == "nrrd":  # NRRD keeps doubles: bit-exact
        assert seg.GetSpacing() == reference.GetSpacing()
        assert seg.GetOrigin() == reference.GetOrigin()
        assert seg.GetDirection() == reference.GetDirection()
    else:  # NIfTI stores float32 geometry
        np.testing.assert_allclose(seg.GetSpacing(), reference.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(seg.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(seg.GetDirection(), reference.GetDirection(), atol=1e-6)
    array = sitk.GetArrayFromImage(seg)
    assert set(np.unique(array)) <= {0, 6} and (array == 6).sum() > 0.2 * array.size
    assert volumes.read_label_names(out) == {1: "spleen", 6: "liver"}  # every organ the model knows


def test_progress_jsonl_schema_and_stats(tmp_path, card, volume, capsys):
    src = volumes.write_image(volume, tmp_path / "ct.nii.gz")
    out, stats = tmp_path / "seg.nii.gz", tmp_path / "stats.csv"
    code, stdout, err = _segment([src, out, "--model", card, "--device", "cpu", "--progress", "jsonl",
                                  "--stats", stats, "--fast"], capsys)
    assert code == 0, err
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]  # every line is JSON
    for record in records:
        assert record["event"] in EVENTS and isinstance(record["time"], float)
        for key in ("step", "total"):
            assert key not in record or isinstance(record[key], int)
    assert records[0]["event"] == "start" and records[-1]["event"] == "done"
    # "engine" comes after load_model when an optional CPU engine is installed (--engine auto)
    stages = [r["stage"] for r in records if r["event"] == "stage" and r["stage"] != "engine"]
    assert stages[:2] == ["load_model", "read"] and "inference" in stages and stages[-1] == "write"
    windows = [r for r in records if r["event"] == "progress" and r.get("stage") == "inference"]
    assert windows and windows[-1]["step"] == windows[-1]["total"]
    done = records[-1]
    assert done["outputs"] == [str(out)]
    assert {"load_model", "read", "preprocess", "inference", "postprocess", "write", "total"} <= set(done["timings"])
    rows = list(csv.DictReader(open(stats)))
    assert [r["name"] for r in rows] == ["spleen", "liver"]
    liver_voxels = int((sitk.GetArrayFromImage(sitk.ReadImage(str(out))) == 6).sum())
    assert int(rows[1]["voxels"]) == liver_voxels
    assert float(rows[1]["volume_ml"]) == pytest.approx(liver_voxels * 1.5 * 1.7 * 2.1 / 1000, rel=1e-3)


def test_progress_jsonl_error_event(tmp_path, card, capsys):
    code, stdout, err = _segment([tmp_path / "missing.nii.gz", tmp_path / "seg.nii.gz", "--model", card,
                                  "--progress", "jsonl"], capsys)
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert code == 2 and records[-1]["event"] == "error" and "does not exist" in records[-1]["message"]
    assert "does not exist" in err


def test_box_and_batch_mode(tmp_path, card, volume, capsys):
    folder = tmp_path / "cases"
    volumes.write_image(volume, folder / "a.nii.gz")
    volumes.write_image(volume, folder / "b.nrrd")
    out = tmp_path / "segs"
    code, _, err = _segment([folder, out, "--model", card, "--device", "cpu", "--box", "4,5,6,20,22,24",
                             "--largest-component"], capsys)
    assert code == 0, err
    assert "deprecated" not in err
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".json")) == ["a.nii.gz", "b.nrrd"]
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "b.nrrd")))  # (z, y, x)
    inside = np.zeros(array.shape, bool)
    inside[6:24, 5:22, 4:20] = True
    assert not array[~inside].any() and array[inside].any()


def test_bad_box(tmp_path, card, volume, capsys):
    src = volumes.write_image(volume, tmp_path / "ct.nii.gz")
    out = tmp_path / "seg.nii.gz"
    for box, message in (("0,0,0,40,10,10", "outside the volume"), ("1,2,3", "six integers")):
        code, _, err = _segment([src, out, "--model", card, "--device", "cpu", "--box", box], capsys)
        assert code == 2 and "--box" in err and message in err and not out.exists()
    with pytest.raises(Exception, match="outside the volume"):
        infer.parse_box("5,5,5,5,10,10", (32, 32, 32))  # empty box
    with pytest.raises(Exception, match="six integers"):
        infer.parse_box("a,b,c,d,e,f", (32, 32, 32))


def test_old_roi_name_is_a_deprecated_alias_of_box(capsys):
    """``segment --roi`` (the voxel box's old name) still parses into ``box`` for one release, with one notice."""
    from logonet import cli

    parser, _ = cli.command_parser("segment")
    args = parser.parse_args(["in.nii.gz", "out.nii.gz", "--roi", "1,2,3,4,5,6"])
    err = capsys.readouterr().err
    assert args.box == "1,2,3,4,5,6" and not hasattr(args, "roi")
    assert err == "logonet segment: --roi is deprecated and will be removed in the next release; use --box\n"
    assert parser.parse_args(["in.nii.gz", "out.nii.gz", "--box", "1,2,3,4,5,6"]).box == "1,2,3,4,5,6"
    assert capsys.readouterr().err == "" and "--roi" not in parser.format_help()


def test_bad_inputs_clear_error_nothing_written(tmp_path, card, volume, capsys):
    flat = sitk.GetImageFromArray(np.zeros((20, 20), np.int16))
    sitk.WriteImage(flat, str(tmp_path / "slice.nii.gz"))
    (tmp_path / "notes.nii.gz").write_text("this is not an image")
    src = volumes.write_image(volume, tmp_path / "ct.nii.gz")
    out = tmp_path / "out" / "seg.nii.gz"
    cases = [
        ([tmp_path / "slice.nii.gz", out, "--model", card], "2-D"),
        ([tmp_path / "notes.nii.gz", out, "--model", card], "cannot read"),
        ([src, out, "--model", tmp_path / "missing-model"], "not found"),
        ([src, tmp_path / "seg.txt", "--model", card], "must end in"),
        ([tmp_path / "nothing.nii.gz", out, "--model", card], "does not exist"),
        ([src, src, "--model", card], "is the input image itself"),
        ([src, out, "--model", card, "--sw-batch", "0"], "--sw-batch must be at least 1"),
        ([volumes.write_image(sitk.Image(volume.GetSize(), sitk.sitkInt16) - 2000, tmp_path / "air.nii.gz"), out,
          "--model", card], "Hounsfield"),
    ]
    for args, message in cases:
        code, _, err = _segment([*args, "--device", "cpu"], capsys)
        assert code == 2, (args, err)
        assert message in err and err.startswith("logonet segment: error:"), err
    tampered = tmp_path / "tampered"
    modelcard.save(tampered, modelcard.load(card).state_dict(), name="t",
                   architecture=modelcard.load(card).architecture, labels=modelcard.load(card).labels,
                   preprocessing=modelcard.load(card).preprocessing)
    raw = bytearray((tampered / "weights.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tampered / "weights.safetensors").write_bytes(bytes(raw))
    pickled = tmp_path / "pickled"
    modelcard.save(pickled, modelcard.load(card).state_dict(), name="p",
                   architecture=modelcard.load(card).architecture, labels=modelcard.load(card).labels,
                   preprocessing=modelcard.load(card).preprocessing)
    torch.save(modelcard.load(card).state_dict(), pickled / "weights.safetensors")
    for bad, message in ((tampered, "modified since"), (pickled, "pickle")):
        code, _, err = _segment([src, out, "--model", bad, "--device", "cpu"], capsys)
        assert code == 2 and message in err, err
    assert not out.exists() and not (tmp_path / "out").exists()
    assert volumes.read_image(src).GetPixelID() == volume.GetPixelID()  # the CT was not replaced by a labelmap
    batch = tmp_path / "batch"
    volumes.write_image(volume, batch / "a.nii.gz")
    code, _, err = _segment([batch, batch, "--model", card, "--device", "cpu"], capsys)
    assert code == 2 and "is the input image itself" in err, err


def test_keep_largest_component():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:4, 1:4, 1:4] = 6  # 27 voxels
    labels[7, 7, 7] = 6  # a stray voxel
    labels[6:9, 1:3, 1:3] = 1
    out = infer.keep_largest_component(labels, [1, 6])
    assert (out == 6).sum() == 27 and out[7, 7, 7] == 0 and (out == 1).sum() == 12


def test_cuda_oom_falls_back_to_cpu_stitching_then_cpu(card, volume, monkeypatch):
    """Simulated: the predictor believes it is on CUDA; the first two attempts run out of memory."""
    events = []

    class Sink:
        def write(self, text):
            events.extend(json.loads(line) for line in text.splitlines() if line)

        def flush(self):
            pass

    predictor = infer.Predictor(card, device="cpu", reporter=ProgressReporter("jsonl", stream=Sink()))
    expected, _ = predictor.predict(volume)
    predictor.device = torch.device("cuda")
    real = infer.sliding_window_logits
    calls = []

    def fake(model, image, roi, *, device, stitch_device=None, **kw):
        calls.append((device.type, stitch_device.type))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, image, roi, device=device, stitch_device=stitch_device, **kw)

    monkeypatch.setattr(infer, "sliding_window_logits", fake)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    labels, _ = predictor.predict(volume)
    assert calls == [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cpu")]
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("stitching windows on the CPU" in w for w in warnings)
    assert any("whole inference on the CPU" in w for w in warnings)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(expected))


def test_oom_on_cpu_is_not_swallowed(card, volume, monkeypatch):
    predictor = infer.Predictor(card, device="cpu")

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(infer, "sliding_window_logits", boom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predictor.predict(volume)


@pytest.mark.parametrize("shape,roi,overlap", [((40, 33, 20), (16, 16, 16), 0.5), ((16, 16, 16), (16, 16, 16), 0.25),
                                               ((50, 17, 9), (32, 16, 8), 0.75), ((10, 70, 8), (16, 32, 8), 0.0)])
def test_count_windows_is_what_monai_sliding_window_visits(shape, roi, overlap):
    """The window count (progress totals) equals the windows MONAI's sliding_window_inference really runs."""
    from monai.inferers import sliding_window_inference

    seen = []

    def predictor(window):
        seen.append(window.shape[0])
        return window

    sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, predictor, overlap=overlap)
    assert sum(seen) == infer.count_windows(shape, roi, overlap)



def test_default_overlap_is_the_one_the_cards_checkpoint_was_validated_at(card, tmp_path):
    assert infer.Predictor(card, device="cpu").overlap == infer.DEFAULT_OVERLAP  # card without val_overlap
    meta = json.loads((card / "model.json").read_text())
    validated = tmp_path / "validated"
    shutil.copytree(card, validated)
    meta["metrics"] = {"val_overlap": 0.25}
    (validated / "model.json").write_text(json.dumps(meta))
    assert infer.Predictor(validated, device="cpu").overlap == 0.25
    assert infer.Predictor(validated, device="cpu", overlap=0.6).overlap == 0.6  # an explicit --overlap wins
    meta["metrics"] = {"val_overlap": 1.5}
    (validated / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"metrics.val_overlap.*\[0, 1\).*1.5"):
        infer.Predictor(validated, device="cpu")


def test_the_suite_never_exports_into_the_real_user_cache():
    """conftest points every test (and the CLI subprocesses) at a scratch engine cache."""
    import os

    from logonet.data.sample import user_cache_dir
    from logonet.engines import cache_root

    assert os.environ.get("LOGONET_ENGINE_CACHE") and cache_root() != user_cache_dir() / "engines"


def test_one_window_per_pass_on_the_cpu_unless_asked(tiny_card):
    from logonet.infer import DEFAULT_SW_BATCH, Predictor

    assert DEFAULT_SW_BATCH == {"cpu": 1, "cuda": 4}
    assert Predictor(tiny_card, device="cpu").sw_batch_size == 1  # batching windows only costs memory here
    assert Predictor(tiny_card, device="cpu", sw_batch_size=3).sw_batch_size == 3
    with pytest.raises(UserError, match="--sw-batch must be at least 1"):
        Predictor(tiny_card, device="cpu", sw_batch_size=0)
