"""``logonet bench``: each sub-command on tiny settings writes its markdown table, CSV and machine description
with the expected columns and sane numbers; ``bench report`` pastes the tables into a document."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from logonet import cli, process_setup
from logonet.bench import common
from logonet.bench.report import fill
from logonet.bench.selfsup import summarize


def _positive(row, *keys):
    for key in keys:
        assert float(row[key]) > 0, (key, row)


def test_speed_tiny(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "speed", "--out", str(out), "--size", "32", "--models", "logonet:S,ulkanet:T",
                     "--threads", "1", "--warmup", "0", "--runs", "1", "--no-compile", "--progress", "none"]) == 0
    rows = {r["model"]: r for r in common.read_csv(out / "speed.csv")}
    assert list(rows) == ["logonet:S", "ulkanet:T"]
    for key in ("params_ratio", "macs_ratio", "time_ratio", "mem_ratio"):
        assert float(rows["logonet:S"][key]) == pytest.approx(1.0)
    for row in rows.values():
        _positive(row, "params_m", "gmacs", "forward_s", "peak_mib")
    assert float(rows["ulkanet:T"]["params_ratio"]) < 0.1  # T is tiny next to S
    local = common.read_csv(out / "speed_local.csv")
    assert [r["path"].split()[0] for r in local] == ["batched", "loop"]
    assert float(local[0]["max_abs_diff"]) < 1e-4  # same maths
    _positive(local[0], "median_s", "speedup_vs_loop")
    variants = {r["variant"]: r for r in common.read_csv(out / "speed_variants.csv")}
    assert float(variants["LoGoNet-S float32"]["speedup"]) == pytest.approx(1.0)
    assert variants["LoGoNet-S torch.compile (inductor)"]["status"].startswith("skipped")
    parts = common.read_csv(out / "speed_profile.csv")
    assert len(parts) == 3 and sum(float(p["share"]) for p in parts) == pytest.approx(1.0, abs=1e-3)
    text = (out / "speed.md").read_text()
    assert "| logonet:S |" in text and "Machine:" in text and "logonet bench speed" in text
    machine = json.loads((out / "speed_machine.json").read_text())
    assert machine["torch_threads"] == 1
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    ops = common.read_csv(out / "speed_ops.csv")  # LoGoNet-S's operators, by default
    assert ops[0]["threads"] == "1" and ops[0]["load"] == "idle" and ops[0]["model"] == "logonet:S"
    assert sum(float(r["share"]) for r in ops) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_speed_thread_list_and_busy_core_in_fresh_processes(tmp_path, capsys, monkeypatch):
    """``--threads 1,2 --busy-core``: four measurements (1 and 2 threads, idle and with one CPU-burning process),
    each in its own process with that many threads and the CLI's OpenMP wait setting; the scaling table's times are
    the measurements' own and its ratios are computed from them; the operator profile is there for every
    measurement."""
    for name in process_setup.OPENMP_USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "bench"
    assert cli.main(["bench", "speed", "--out", str(out), "--size", "32", "--models", "logonet:T", "--threads", "1,2",
                     "--busy-core", "--runs", "1", "--warmup", "0", "--no-variants", "--op-profile", "logonet:T",
                     "--top-ops", "5", "--progress", "none"]) == 0
    rows = {(r["load"], int(r["threads"])): r for r in common.read_csv(out / "speed_threads.csv")}
    assert sorted(rows) == [("busy", 1), ("busy", 2), ("idle", 1), ("idle", 2)]
    for (load, threads), row in rows.items():
        child = out / "speed_runs" / f"threads{threads}_{load}_round1"
        (measured,) = common.read_csv(child / "speed.csv")
        assert measured["model"] == "logonet:T" and float(measured["forward_s"]) > 0
        assert float(row["forward_s"]) == pytest.approx(float(measured["forward_s"]), rel=1e-5)
        child_machine = json.loads((child / "speed_machine.json").read_text())
        assert child_machine["torch_threads"] == threads
        assert child_machine["gomp_spincount"] == process_setup.OPENMP_DEFAULTS["GOMP_SPINCOUNT"]
    for load in ("idle", "busy"):
        one, two = float(rows[(load, 1)]["forward_s"]), float(rows[(load, 2)]["forward_s"])
        assert float(rows[(load, 1)]["ratio_vs_base"]) == pytest.approx(1.0)
        assert float(rows[(load, 2)]["ratio_vs_base"]) == pytest.approx(two / one, rel=1e-4)
    for threads in (1, 2):
        assert float(rows[("busy", threads)]["busy_vs_idle"]) == pytest.approx(
            float(rows[("busy", threads)]["forward_s"]) / float(rows[("idle", threads)]["forward_s"]), rel=1e-4)
    ops = common.read_csv(out / "speed_ops.csv")
    assert {(r["load"], r["threads"]) for r in ops} == {("idle", "1"), ("idle", "2"), ("busy", "1"), ("busy", "2")}
    for key in {(r["load"], r["threads"]) for r in ops}:
        group = [r for r in ops if (r["load"], r["threads"]) == key]
        assert len(group) == 6 and group[-1]["operator"].startswith("(all others")  # top 5 + the rest
        assert [float(r["self_ms"]) for r in group[:5]] == sorted((float(r["self_ms"]) for r in group[:5]), reverse=True)
        assert sum(float(r["share"]) for r in group) == pytest.approx(1.0, abs=1e-3)
        assert any("conv" in r["operator"] for r in group)
    machine = json.loads((out / "speed_machine.json").read_text())
    assert machine["torch_threads"] == "1,2" and machine["busy_core"] is True
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    text = (out / "speed.md").read_text()
    assert "Thread scaling" in text and "operators by self CPU time" in text
    assert "| logonet:T | busy | 2 |" in text and "GOMP_SPINCOUNT=1000" in text


def test_speed_refuses_bad_thread_lists(tmp_path, capsys):
    for bad in ("0", "1,x", "2,2"):
        assert cli.main(["bench", "speed", "--out", str(tmp_path), "--threads", bad]) == 2
        assert "--threads" in capsys.readouterr().err


def test_speed_refuses_bad_size(tmp_path, capsys):
    assert cli.main(["bench", "speed", "--out", str(tmp_path), "--size", "40"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_volume_tiny_synthetic(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "volume", "--out", str(out), "--models", "demo", "--cases", "btcv",
                     "--synthetic-shape", "64,64,24", "--synthetic-spacing", "2,2,4", "--overlaps", "0.25",
                     "--threads", "1", "--progress", "none"]) == 0
    (row,) = common.read_csv(out / "volume.csv")
    assert (row["model"], row["case"], row["input_size"]) == ("demo", "btcv", "64x64x24")
    stages = ["load_model_s", "read_s", "preprocess_s", "inference_s", "postprocess_s", "write_s"]
    _positive(row, "total_s", "inference_s", "peak_mib", "inference_peak_mib", "window_batches")
    assert float(row["total_s"]) >= sum(float(row[s]) for s in stages) - 1e-3
    memory = common.read_csv(out / "volume_memory.csv")[0]
    assert float(memory["inference_peak_mib"]) >= float(memory["load_model_peak_mib"]) * 0.5
    assert "| demo | btcv |" in (out / "volume.md").read_text()
    assert "sliding-window batches of 1 windows" in (out / "volume.md").read_text()  # what Predictor used on the CPU


def test_synthetic_volume_geometry():
    from logonet.bench.volume import synthetic_volume

    image = synthetic_volume((40, 30, 10), (0.8, 0.8, 2.5))
    assert image.GetSize() == (40, 30, 10) and image.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))


def test_accuracy_one_step(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "accuracy", "--out", str(out), "--models", "logonet:T,ulkanet:T,dynunet", "--size", "32",
                     "--roi", "32", "--train-cases", "1", "--test-cases", "1", "--epochs", "1", "--samples", "2",
                     "--threads", "1", "--progress", "none"]) == 0
    rows = common.read_csv(out / "accuracy.csv")
    assert [r["model"] for r in rows] == ["logonet:T", "ulkanet:T", "dynunet"]
    # DynUNet's six levels leave one voxel of a 32^3 crop: its failure is a row, not the end of the benchmark
    assert rows[2]["status"].startswith("failed") and rows[2]["mean_dice"] == ""
    for row in rows[:2]:
        assert row["status"] == "ok"
        assert 0.0 <= float(row["mean_dice"]) <= 1.0
        assert "dice_liver" in row and "dice_left_adrenal_gland" in row
    assert "Local+global ablation (T)" in (out / "accuracy.md").read_text()


def test_ssl_one_step(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "ssl", "--out", str(out), "--size", "32", "--roi", "32", "--unlabeled", "2",
                     "--labeled", "1", "--seeds", "2", "--test-cases", "1", "--epochs", "1", "--pretrain-epochs", "1",
                     "--samples", "2", "--clusterers", "2", "--k-min", "2", "--k-max", "4", "--no-ablations",
                     "--threads", "1", "--progress", "none"]) == 0
    rows = {r["variant"]: r for r in common.read_csv(out / "ssl.csv")}
    assert set(rows) == {"scratch", "ssl"}
    assert rows["ssl"]["seeds"] == "2" and len(rows["ssl"]["per_seed"].split()) == 2
    assert rows["ssl"]["beyond_spread"] in ("yes", "no")
    assert "seed spread" in (out / "ssl.md").read_text()


def test_summarize_gain_against_spread():
    rows = {(r["variant"], r["labeled"]): r for r in summarize({
        ("scratch", 2): [0.50, 0.52, 0.48], ("ssl", 2): [0.60, 0.61, 0.59],
        ("scratch", 4): [0.60, 0.70], ("ssl", 4): [0.62, 0.72]})}
    assert rows[("ssl", 2)]["gain_vs_scratch"] == pytest.approx(0.10)
    assert rows[("ssl", 2)]["beyond_spread"] == "yes"
    assert rows[("ssl", 4)]["beyond_spread"] == "no"  # +0.02 inside a spread of 0.07
    assert "gain_vs_scratch" not in rows[("scratch", 2)]


def test_markdown_and_ratio_helpers():
    table = common.markdown_table([{"a": 1.23456, "b": float("nan"), "c": "x|y"}],
                                  [("a", "A", ".2f"), ("b", "B", ".1f"), ("c", "C", "")])
    assert table.splitlines() == ["| A | B | C |", "|---|---|---|", "| 1.23 | n/a | x/y |"]
    assert common.ratio(3, 2) == 1.5 and math.isnan(common.ratio(1, 0)) and math.isnan(common.ratio(None, 1))


def test_report_fills_markers(tmp_path, capsys):
    (tmp_path / "speed.md").write_text("### Speed\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "speed.md").write_text("| b |\n|---|\n| 2 |\n")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\nprose\n<!-- bench:speed -->\nold\n<!-- /bench:speed -->\n"
                   "<!-- bench:final/speed -->\n<!-- /bench:final/speed -->\n"
                   "<!-- bench:ssl -->\n(not run)\n<!-- /bench:ssl -->\nend\n")
    text, filled, missing = fill(doc.read_text(), tmp_path)
    assert filled == ["speed", "final/speed"] and missing == ["ssl"]
    assert "| 1 |" in text and "| 2 |" in text and "old" not in text and "(not run)" in text
    assert text.endswith("end\n")
    assert cli.main(["bench", "report", "--out", str(tmp_path), "--doc", str(doc)]) == 0
    assert doc.read_text() == text
    assert fill(text, tmp_path)[0] == text  # idempotent


def test_gpu_script_runs_on_the_cpu_with_tiny_sizes(tmp_path, capsys):
    """The prepared GPU run (bench gpu) on the CPU: LoGoNet-T on one 64^3 window, a training step, the
    out-of-memory row says it needs CUDA, float16 autocast is skipped on the CPU, a bad variant is refused."""
    import torch

    from logonet.bench import gpu

    assert gpu.paper_grid() == (273, 273, 150)  # 512x512x120 at 0.8x0.8x2.5 mm -> 1.5x1.5x2 mm
    cpu = torch.device("cpu")
    row = gpu.case_row("logonet:T", {}, gpu.VARIANTS[0], (64, 64, 48), 64, cpu, runs=1)
    assert row["status"] == "ok" and row["case_s"] > 0 and row["first_call_s"] > 0 and row["peak_mib"] > 0
    assert gpu.case_row("logonet:T", {}, gpu.VARIANTS[1], (64, 64, 48), 64, cpu, 1)["status"].startswith("skipped")
    assert gpu.oom_fallback_row("logonet:T", (64, 64, 48), 64, cpu)["status"] == "skipped (no CUDA device)"
    step = gpu.train_row("logonet:T", 64, cpu, runs=1)
    assert step["status"] == "ok" and step["step_s"] > 0 and step["amp"] == "off"
    assert cli.main(["bench", "gpu", "--tiny", "--device", "cpu", "--variants", "fp64", "--out", str(tmp_path)]) == 2
    assert "unknown --variants ['fp64']" in capsys.readouterr().err
    assert cli.main(["bench", "gpu", "--tiny", "--device", "cpu", "--parts", "train,disk", "--out", str(tmp_path)]) == 2
    assert "unknown --parts ['disk']" in capsys.readouterr().err
    # --parts runs only the named sections (a lease split across calls): here the training step alone
    assert cli.main(["bench", "gpu", "--tiny", "--device", "cpu", "--parts", "train", "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("gpu*.csv"))
    assert written == ["gpu_train.csv"], written


def test_gpu_run_writes_each_case_row_as_it_finishes(tmp_path, monkeypatch):
    """bench gpu files the case table row by row, variant by variant with both models in turn: a run killed by a
    lease's time limit after its second case still leaves both fp32 rows in gpu.md and gpu_cases.csv (the second
    lease lost every row that had finished). Simulated: case_row gives canned rows, the third call is the kill."""
    from logonet.bench import common, gpu

    done = []

    def fake_case_row(spec, kwargs, variant, shape, roi, device, runs):
        if len(done) == 2:
            raise KeyboardInterrupt  # what timeout's SIGTERM amounts to: nothing after this point runs
        done.append((spec, variant[0]))
        return {"model": spec, "variant": variant[0], "case_s": 1.5 + len(done), "status": "ok"}

    monkeypatch.setattr(gpu, "case_row", fake_case_row)
    assert cli.main(["bench", "gpu", "--tiny", "--device", "cpu", "--parts", "cases", "--variants", "fp32,bf16",
                     "--progress", "none", "--out", str(tmp_path)]) == 130  # the CLI's exit code on an interrupt
    assert done == [("logonet:T", "fp32"), ("swinunetr", "fp32")]
    rows = common.read_csv(tmp_path / "gpu_cases.csv")
    assert [(r["model"], r["variant"], r["case_s"]) for r in rows] == [("logonet:T", "fp32", "2.5"),
                                                                         ("swinunetr", "fp32", "3.5")]
    report = (tmp_path / "gpu.md").read_text()
    assert "(partial)" in report and "| logonet:T | fp32 | 2.50" in report, report
    # a run that ends normally: every row, and the title no longer says partial
    done.clear()
    monkeypatch.setattr(gpu, "case_row", lambda spec, kwargs, variant, *rest: {
        "model": spec, "variant": variant[0], "case_s": 1.0, "status": "ok"})
    assert cli.main(["bench", "gpu", "--tiny", "--device", "cpu", "--parts", "cases", "--variants", "fp32,bf16",
                     "--progress", "none", "--out", str(tmp_path)]) == 0
    assert len(common.read_csv(tmp_path / "gpu_cases.csv")) == 4
    assert "(partial)" not in (tmp_path / "gpu.md").read_text()
    assert gpu.oom_shape(96) == (192, 192, 96)


def test_gpu_oom_row_limits_the_current_device_by_index_and_lifts_the_limit(monkeypatch):
    """The out-of-memory row on a bare "cuda" device (no index, as `--device cuda` gives): the memory fraction is
    set on the current device's index (torch refuses a bare "cuda": that crashed the first GPU lease) at 1 GiB's
    worth, lifted afterwards, and a failure inside is the row's status. Simulated here: torch.cuda's calls are
    recorded and the Predictor runs on the CPU."""
    from types import SimpleNamespace

    import torch

    from logonet import infer
    from logonet.bench import gpu

    calls = []

    def set_fraction(fraction, device=None):
        if not isinstance(device, int):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        calls.append((fraction, device))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=64 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)

    class BareCuda:
        type, index = "cuda", None

        def __str__(self):
            return "cpu"  # the Predictor's device: the segmentation itself runs on this machine's CPU

    row = gpu.oom_fallback_row("logonet:T", (70, 64, 64), 64, BareCuda())
    assert row["status"] == "ok" and row["path"] == "GPU (no fallback needed)" and row["seconds"] > 0, row
    assert calls == [(1 / 64, 0), (1.0, 0)]

    calls.clear()

    def out_of_memory(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(infer.Predictor, "logits", out_of_memory)
    row = gpu.oom_fallback_row("logonet:T", (70, 64, 64), 64, BareCuda(), fraction=0.01)
    assert row["status"] == "failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", row
    assert calls == [(0.01, 0), (1.0, 0)]


def test_volume_paper_cards_use_the_papers_setting_and_the_targets_are_stated(monkeypatch, tmp_path):
    from logonet.bench import volume

    made = []
    monkeypatch.setattr(volume, "random_card", lambda folder, **kwargs: made.append(kwargs) or folder)
    assert volume.model_card("swinunetr-paper", tmp_path) == tmp_path / "swinunetr-paper"
    assert volume.model_card("logonet-S-paper", tmp_path) == tmp_path / "logonet-S-paper"
    assert volume.model_card("/some/card", tmp_path) == Path("/some/card")
    assert [(m["model_name"], m["preset"]) for m in made] == [("swinunetr", None), ("logonet", "S")]
    assert all(m["preprocessing"] == {"spacing": [1.5, 1.5, 2.0], "roi_size": [96, 96, 96],
                                      "intensity_window": [-175.0, 250.0]} for m in made)

    rows = [{"model": "logonet-S-paper", "case": "btcv", "overlap": 0.5, "total_s": 40.0, "peak_mib": 5000.0},
            {"model": "swinunetr-paper", "case": "btcv", "overlap": 0.5, "total_s": 100.0, "peak_mib": 3000.0},
            {"model": "logonet-S-paper", "case": "sample", "overlap": 0.5, "total_s": 9.0, "peak_mib": 7000.0}]
    (note,) = volume.paper_notes(rows)  # the sample row has no SwinUNETR partner: no note
    assert note.startswith("btcv, overlap 0.5: LoGoNet-S / SwinUNETR-48 total time 0.40 (40.0 s / 100.0 s)")
    assert "target <= 0.5 met" in note and "5.24 GB (5000 MiB): target < 6 GB met" in note
    rows[0].update(total_s=60.0, peak_mib=6000.0)
    (note,) = volume.paper_notes(rows)
    assert "target <= 0.5 MISSED" in note and "target < 6 GB MISSED" in note


def test_speed_rows_are_timed_without_the_optional_fvcore(monkeypatch):
    """fvcore (the 'bench' extra) only counts MACs: without it a speed row still has its time, MACs n/a (a bare
    GPU image has no fvcore: the first lease's speed table died on it)."""
    import torch

    from logonet.bench import speed
    from logonet.nets import complexity

    def no_fvcore(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'fvcore'")

    monkeypatch.setattr(complexity, "count_macs", no_fvcore)
    row = speed.measure_model("logonet:T", 32, 14, torch.device("cpu"), 0, 1)
    assert row["status"] == "ok" and row["gmacs"] is None and row["forward_s"] > 0 and row["params_m"] > 0
