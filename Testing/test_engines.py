"""``logonet.engines`` and ``segment --engine``: ONNX Runtime and OpenVINO give torch's labels, exports are cached
by weights hash and window (the second call exports nothing), a missing package is torch with exactly one notice;
``logonet bench engines`` on tiny settings. The optional packages are skipped cleanly where not installed."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from logonet import cli, engines, infer, modelcard
from logonet.bench import common
from logonet.data import volumes
from logonet.data.labels import btcv_label_dicts
from logonet.data.phantom import make_phantom, phantom_image
from logonet.events import ProgressReporter

ROI = 32
OPTIONAL = ("onnxruntime", "openvino")


def _need(engine: str) -> None:
    pytest.importorskip(engines.PACKAGES[engine])
    pytest.importorskip("onnx")  # torch.onnx's exporter needs it


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One user cache folder for the module (the LoGoNet-T export is made once and shared by the tests)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOGONET_CACHE", str(folder))
        patch.delenv("LOGONET_ENGINE_CACHE", raising=False)  # conftest's scratch folder: these tests check paths
        yield folder


@pytest.fixture(scope="module")
def card(tmp_path_factory, cache):
    """A LoGoNet-T card with random weights and a 32^3 window (3 classes)."""
    torch.manual_seed(0)
    arch = {"name": "logonet", "preset": "T", "in_channels": 1, "out_channels": 3, "kwargs": {}}
    net = modelcard.build_network(arch)
    return modelcard.save(tmp_path_factory.mktemp("card") / "tiny", net.state_dict(), name="tiny", architecture=arch,
                          labels=btcv_label_dicts([1, 6]),
                          preprocessing={"spacing": [3.0, 3.0, 3.0], "intensity_window": [-175.0, 250.0],
                                         "roi_size": [ROI] * 3})


@pytest.fixture(scope="module")
def ct():
    hu, _ = make_phantom(size=48, seed=1)
    return phantom_image(hu, spacing=(2.0, 2.0, 2.5))


@pytest.fixture(scope="module")
def torch_labels(card, ct):
    labels, _ = infer.Predictor(card, device="cpu", overlap=0.25).predict(ct)
    return sitk.GetArrayFromImage(labels)


@pytest.mark.parametrize("engine", OPTIONAL)
def test_engine_labels_equal_torch(engine, card, ct, torch_labels, cache):
    _need(engine)
    predictor = infer.Predictor(card, device="cpu", overlap=0.25, engine=engine)
    assert predictor.engine == engine
    labels = sitk.GetArrayFromImage(predictor.predict(ct)[0])
    assert (labels == torch_labels).mean() >= 0.999
    window = torch.rand(2, 1, ROI, ROI, ROI, generator=torch.Generator().manual_seed(0))  # a batch of two windows
    with torch.no_grad():
        reference = predictor.net(window)
    out = predictor._window_forward(window)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert float((out - reference).abs().max()) < 1e-3
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.999
    assert engines.cache_folder(predictor.card).parent == cache / "engines"


def test_openvino_bf16_is_asked_for_and_close(card):
    _need("openvino")
    net = modelcard.load(card).build_model()
    forward = engines.window_forward(net, "openvino", (ROI,) * 3, engines.cache_folder(modelcard.load(card)),
                                     precision="bf16", threads=1)
    assert forward.precision == "bf16" and forward.runs_as in ("bf16", "fp32")  # fp32 where the CPU has no bf16
    window = torch.rand(1, 1, ROI, ROI, ROI, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = net(window)
    assert float((forward(window) - reference).abs().max()) < 0.05 * float(reference.abs().max()) + 1e-3


def test_cache_key_follows_weights_architecture_and_window():
    arch = {"name": "logonet", "preset": "T", "out_channels": 3}
    key = engines.cache_key("a" * 64, arch, (64, 64, 64))
    assert key == engines.cache_key("a" * 64, dict(reversed(list(arch.items()))), (64, 64, 64))  # order-free
    assert key != engines.cache_key("b" * 64, arch, (64, 64, 64))
    assert key != engines.cache_key("a" * 64, arch, (96, 96, 96))
    assert key != engines.cache_key("a" * 64, {**arch, "preset": "S"}, (64, 64, 64))
    assert "a" * 16 in key and "64x64x64" in key
    with pytest.raises(ValueError):
        engines.cache_key("", arch, (64, 64, 64))


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _fake_card(sha: str, roi: int = 8) -> SimpleNamespace:
    return SimpleNamespace(meta={"weights_sha256": sha}, architecture={"name": "tiny", "in_channels": 1},
                           roi_size=(roi,) * 3, weights_path=None)


@pytest.mark.parametrize("engine", OPTIONAL)
def test_second_call_reuses_the_cached_export(engine, tmp_path, monkeypatch):
    _need(engine)
    calls = []
    for name in ("export_onnx", "export_openvino"):
        original = getattr(engines, name)
        monkeypatch.setattr(engines, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    card, net = _fake_card("c" * 64), TinyNet().eval()
    first, forward = engines.for_card(card, net, engine, torch.device("cpu"), root=tmp_path)
    assert first == engine and calls
    made = sorted(calls)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert files and all(not p.name.endswith(".tmp") for p in files)
    again, forward2 = engines.for_card(card, net, engine, torch.device("cpu"), root=tmp_path)
    assert again == engine and sorted(calls) == made  # nothing exported the second time
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == files
    window = torch.rand(3, 1, 8, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(forward2(window).numpy(), net(window).numpy(), atol=1e-5)
    other_window = engines.cache_folder(_fake_card("c" * 64, roi=16), root=tmp_path)
    other_weights = engines.cache_folder(_fake_card("d" * 64), root=tmp_path)
    assert len({engines.cache_folder(card, root=tmp_path), other_window, other_weights}) == 3
    engines.for_card(_fake_card("d" * 64), net, engine, torch.device("cpu"), root=tmp_path)
    assert len(calls) > len(made) and other_weights.is_dir()  # new weights: a new export, in their own folder


@pytest.mark.parametrize("engine", OPTIONAL)
def test_missing_package_is_torch_with_one_notice(engine, card, ct, torch_labels, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, engines.PACKAGES[engine], None)  # importing it now raises ImportError
    assert not engines.installed(engine)
    predictor = infer.Predictor(card, device="cpu", overlap=0.25, engine=engine, reporter=ProgressReporter("none"))
    assert predictor.engine == "torch" and predictor._window_forward is None
    notices = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(notices) == 1 and f"--engine {engine}" in notices[0] and "torch" in notices[0]
    assert "logonet[engines]" in notices[0]
    labels = sitk.GetArrayFromImage(predictor.predict(ct)[0])
    assert np.array_equal(labels, torch_labels)


def test_segment_engine_option_end_to_end(tmp_path, card, ct, torch_labels, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)
    src = volumes.write_image(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "seg.nii.gz"
    code = cli.main(["segment", str(src), str(out), "--model", str(card), "--device", "cpu", "--overlap", "0.25",
                     "--engine", "openvino", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert len([line for line in err.splitlines() if "warning" in line]) == 1 and "--engine openvino" in err
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), torch_labels)


def test_auto_takes_the_first_installed_engine_of_the_order(monkeypatch):
    cpu, notices = torch.device("cpu"), []
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr(engines, "AUTO_ORDER", ("openvino", "torch"))
    assert engines.resolve_engine("auto", cpu, notices.append) == "torch" and not notices  # silent
    monkeypatch.setattr(engines, "AUTO_ORDER", ("openvino", "onnxruntime", "torch"))
    expected = "onnxruntime" if engines.installed("onnxruntime") else "torch"
    assert engines.resolve_engine("auto", cpu, notices.append) == expected and not notices
    assert engines.resolve_engine("auto", torch.device("meta"), notices.append) == "torch"  # not a CPU
    assert engines.resolve_engine("onnxruntime", torch.device("meta"), notices.append) == "torch"
    assert len(notices) == 1 and "CPU only" in notices[0]
    with pytest.raises(Exception, match="unknown engine"):
        engines.resolve_engine("tensorrt", cpu)
    assert engines.resolve_engine("torch", cpu) == "torch"


def test_a_failed_export_is_torch_with_one_notice(tmp_path, monkeypatch):
    _need("onnxruntime")

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator\nmore detail")

    monkeypatch.setattr(engines, "export_onnx", broken)
    notices = []
    engine, forward = engines.for_card(_fake_card("e" * 64), TinyNet().eval(), "onnxruntime", torch.device("cpu"),
                                       notify=notices.append, root=tmp_path)
    assert (engine, forward) == ("torch", None)
    assert len(notices) == 1 and "unsupported operator" in notices[0] and "more detail" not in notices[0]


def test_bench_engines_tiny(tmp_path, card, ct, cache, capsys):
    _need("onnxruntime")
    ct_path = volumes.write_image(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "bench"
    assert cli.main(["bench", "engines", "--presets", "T", "--roi", str(ROI), "--model", str(card), "--repeats", "1",
                     "--warmup", "0", "--threads", "1", "--engines", "torch,onnxruntime", "--sample-ct", str(ct_path),
                     "--out", str(out), "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "| network |" in printed and "onnxruntime" in printed
    rows = {(r["engine"], r["precision"]): r for r in common.read_csv(out / "engines.csv")}
    assert list(rows) == [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "bf16")]
    assert float(rows[("torch", "fp32")]["speedup"]) == pytest.approx(1.0)
    assert rows[("onnxruntime", "fp32")]["status"] == "ok" and float(rows[("onnxruntime", "fp32")]["max_abs_diff"]) < 1e-3
    assert float(rows[("onnxruntime", "fp32")]["ms_per_window"]) > 0
    assert rows[("onnxruntime", "bf16")]["status"].startswith("not offered")
    sample = {(r["engine"], r["precision"]): r for r in common.read_csv(out / "engines_sample.csv")}
    assert float(sample[("torch", "fp32")]["agreement"]) == 1.0
    assert float(sample[("onnxruntime", "fp32")]["agreement"]) >= 0.999
    assert sample[("torch", "bf16")]["status"].startswith("not run")
    machine = (out / "engines_machine.json").read_text()
    assert "load_average_end" in machine and "onnxruntime" in machine
    assert (out / "engines.md").read_text().count("Sample CT, onnxruntime fp32") == 1


def test_bench_engines_refuses_unknown_names(capsys):
    assert cli.main(["bench", "engines", "--engines", "torch,tensorrt", "--progress", "none"]) == 2
    assert "tensorrt" in capsys.readouterr().err
    assert cli.main(["bench", "engines", "--presets", "X", "--progress", "none"]) == 2


def test_cache_root_is_the_engine_cache_variable_else_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOGONET_ENGINE_CACHE", str(tmp_path / "scratch"))
    assert engines.cache_root() == tmp_path / "scratch"
    monkeypatch.delenv("LOGONET_ENGINE_CACHE")
    monkeypatch.setenv("LOGONET_CACHE", str(tmp_path / "user"))
    assert engines.cache_root() == tmp_path / "user" / "engines"

