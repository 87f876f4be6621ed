"""Model catalog on the Slicer side: models by URL (issue 12) against a loopback HTTP server, honest accuracy
labels in the tooltip (issue 11), and the organ count taken from the card (issue 12, defect 6)."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest

from slicer_fixtures import write_fake_card  # noqa: F401  (puts LoGoNetSegment/ on sys.path)

LABELS = [{"value": 1, "name": "spleen", "color": [157, 108, 162]},
          {"value": 6, "name": "liver", "color": [221, 130, 101]}]


def card_zip(tmp_path: Path, entries=None, top="organs-v1") -> bytes:
    """A zipped model card the test builds: ``top/model.json`` + ``top/weights.safetensors`` (+ ``entries``)."""
    card = write_fake_card(tmp_path / "build" / top, LABELS)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(card.iterdir()):
            zf.write(path, f"{top}/{path.name}")
        for name, data in (entries or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


class Server:
    """127.0.0.1 HTTP server: ``/<name>`` serves ``files[name]``; ``/cut/<name>`` promises the full length and
    sends half (a dropped connection)."""

    def __init__(self) -> None:
        self.files = {}
        self.requests = []
        files, requests = self.files, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                requests.append(self.path)
                cut = self.path.startswith("/cut/")
                name = self.path[len("/cut/"):] if cut else self.path.lstrip("/")
                data = files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if cut else data)
                self.wfile.flush()
                if cut:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def catalog_with(tmp_path: Path, url: str, sha256: str, title="Organs by URL: {organs} organs"):
    from LoGoNetLib.catalog import ModelCatalog

    catalog_file = tmp_path / "ModelCatalog.json"
    catalog_file.write_text(json.dumps({"format": "logonet-model-catalog", "version": 1, "models": [
        {"id": "organs", "title": title, "url": url, "sha256": sha256, "description": "a model on a server"}]}))
    return ModelCatalog(home=tmp_path / "home", catalog_file=catalog_file)


def cache_contents(tmp_path: Path):
    models = tmp_path / "home" / "models"
    return sorted(str(p.relative_to(models)) for p in models.rglob("*")) if models.exists() else []


def test_model_by_url_is_downloaded_verified_unpacked_and_cached(tmp_path, server):
    data = card_zip(tmp_path)
    server.files["organs.zip"] = data
    catalog = catalog_with(tmp_path, server.url("organs.zip"), hashlib.sha256(data).hexdigest())
    entry = catalog.find("organs")
    assert not entry.downloaded and entry.usable and entry.title == "Organs by URL: ? organs"
    assert "Downloaded on first use" in entry.tooltip()
    seen = []
    ready = catalog.ensure_downloaded(entry, progress=lambda done, total: seen.append((done, total)))
    assert ready.downloaded and [label["name"] for label in ready.labels] == ["spleen", "liver"]
    assert ready.title == "Organs by URL: 2 organs"  # the count comes from the card
    assert ready.path == catalog.download_dir("organs", hashlib.sha256(data).hexdigest())
    assert (ready.path / "weights.safetensors").read_bytes() == b"fake"
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
    # cached: listed once, usable, and no second request
    again = catalog.find("organs")
    assert again.downloaded and again.path == ready.path
    assert [e.id for e in catalog.models()] == ["organs"]
    assert catalog.ensure_downloaded(again) is again and server.requests == ["/organs.zip"]
    assert not [p for p in cache_contents(tmp_path) if ".partial" in p]


def test_segment_logic_downloads_on_first_use_with_progress(tmp_path, server, mrml):  # noqa: F811
    import sys

    import numpy as np

    from LoGoNetSegmentLib.logic import SegmentLogic
    from slicer_fixtures import FAKE_CLI, add_volume

    data = card_zip(tmp_path)
    server.files["organs.zip"] = data
    catalog = catalog_with(tmp_path, server.url("organs.zip"), hashlib.sha256(data).hexdigest())
    logic = SegmentLogic(catalog=catalog, command_prefix=[sys.executable, str(FAKE_CLI)],
                         temp_root=str(tmp_path))
    volume = add_volume(mrml.slicer, np.zeros((10, 12, 14), dtype=np.int16))
    texts = []
    task = logic.process(volume, model="organs", waitForCompletion=True,
                         progressCallback=lambda fraction, text: texts.append(text))
    assert task.state == "succeeded" and task.model.downloaded
    assert any(text.startswith("Downloading the model: ") for text in texts)
    names = [task.segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert names == ["spleen", "liver"]


from slicer_fixtures import mrml  # noqa: E402,F401


@pytest.mark.parametrize("case", ["wrong checksum", "truncated", "dot-dot entry", "absolute entry", "not a zip",
                                  "no card", "not found", "plain http elsewhere"])
def test_bad_downloads_give_a_clear_error_and_leave_nothing_in_the_cache(tmp_path, server, case):
    from LoGoNetLib.errors import LoGoNetError

    good = card_zip(tmp_path)
    sha = hashlib.sha256(good).hexdigest()
    name, url = "organs.zip", None
    if case == "wrong checksum":
        server.files[name] = good
        sha = hashlib.sha256(b"another file").hexdigest()
        expected = "wrong checksum"
    elif case == "truncated":
        server.files[name] = good
        url = server.url("cut/" + name)
        expected = "cut off after"
    elif case == "dot-dot entry":
        data = card_zip(tmp_path, {"organs-v1/../../evil.txt": b"owned"})
        server.files[name], sha, expected = data, hashlib.sha256(data).hexdigest(), "unsafe entry"
    elif case == "absolute entry":
        data = card_zip(tmp_path, {"/tmp/evil.txt": b"owned"})
        server.files[name], sha, expected = data, hashlib.sha256(data).hexdigest(), "unsafe entry"
    elif case == "not a zip":
        data = b"<html>not found</html>"
        server.files[name], sha, expected = data, hashlib.sha256(data).hexdigest(), "not a zip archive"
    elif case == "no card":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            zf.writestr("readme.txt", "hello")
        data = buffer.getvalue()
        server.files[name], sha, expected = data, hashlib.sha256(data).hexdigest(), "holds no model.json"
    elif case == "not found":
        expected = "404"
    else:
        url, expected = "http://example.invalid/organs.zip", "only https URLs"
    catalog = catalog_with(tmp_path, url or server.url(name), sha)
    entry = catalog.find("organs")
    with pytest.raises(LoGoNetError, match=expected):
        catalog.ensure_downloaded(entry)
    assert cache_contents(tmp_path) == [], "a failed download left files in the cache"
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert not catalog.find("organs").downloaded


def test_catalog_entry_without_checksum_is_unusable(tmp_path):
    catalog = catalog_with(tmp_path, "https://example.invalid/organs.zip", "")
    entry = catalog.models()[0]
    assert not entry.usable and "needs the sha256" in entry.error


# ------------------------------------------------------------------------------------- accuracy labels (issue 11)
def _meta(metrics, train=("example_ct",), val=("example_ct",)):
    return {"labels": LABELS, "metrics": metrics,
            "training": {"train_cases": list(train), "val_cases": list(val)}}


def test_tooltip_prefers_dice_on_an_unseen_scan():
    from LoGoNetLib.catalog import dice_summary

    text = dice_summary(_meta({"val_mean_dice": 0.91, "val_dice": {"liver": 0.97}, "val_source": "training_scan",
                               "unseen_mean_dice": 0.62, "unseen_dice": {"spleen": 0.7, "liver": 0.54},
                               "unseen_scan": "AbdomenCT-1K case 12"}))
    assert text.startswith("Dice on unseen scan (AbdomenCT-1K case 12): 0.62")
    assert "spleen 0.70, liver 0.54" in text and "0.91" not in text and "validation" not in text.lower()


@pytest.mark.parametrize("metrics, train, val, expected", [
    ({"val_mean_dice": 0.9086, "val_source": "training_scan"}, ("a",), ("a",),
     "Dice on its training scan (not a held-out test): 0.91"),
    ({"val_mean_dice": 0.5, "val_source": "synthetic"}, ("a",), ("b",),
     "Dice on synthetic validation volumes (not real CT): 0.50"),
    ({"val_mean_dice": 0.8, "val_source": "held_out"}, ("a",), ("b",), "Dice on held-out validation cases: 0.80"),
    ({"val_mean_dice": 0.9}, ("example_ct",), ("example_ct",), "Dice on its training scan (not a held-out test): 0.90"),
    ({"val_mean_dice": 0.7}, ("a", "b"), ("c",), "Dice on its validation cases (source not recorded): 0.70"),
])
def test_tooltip_names_where_the_val_dice_was_measured(metrics, train, val, expected):
    from LoGoNetLib.catalog import dice_summary

    assert dice_summary(_meta(metrics, train, val)).splitlines()[0] == expected


def test_bundled_demo_title_and_tooltip_come_from_its_card():
    from LoGoNetLib.catalog import ModelCatalog

    demo = ModelCatalog(home="/nonexistent-logonet-home").find("demo")
    n = len(demo.labels)
    assert f"{n} abdominal organs" in demo.title and "13" not in demo.title
    tip = demo.tooltip()
    assert f"Segments ({n})" in tip
    # The bundled card carries Dice on the unseen DICOM series: that is what the tooltip shows, per organ too,
    # and never the training-scan or synthetic-validation Dice under the word "validation".
    unseen = demo.meta["metrics"]["unseen_dice"]
    assert "Validation Dice" not in tip and "Dice on unseen scan (example_ct_dicom" in tip
    assert f"liver {unseen['liver']:.2f}" in tip


# ------------------------------------------------------------------------------ one card schema (issue 13)
def test_a_run_folder_reads_the_same_in_slicer_and_on_the_command_line(tmp_path):
    """The catalog reads cards through the core's logonet.cardschema (what `logonet segment --model` uses): a run
    with only last/ is usable on both sides, best/ wins once it exists, and a card the command line refuses is
    refused in Slicer with the same words."""
    from LoGoNetLib.catalog import ModelCatalog, card_folder
    from LoGoNetLib.errors import LoGoNetError
    from logonet import cardschema
    from logonet.errors import UserError

    catalog = ModelCatalog(home=tmp_path / "home", catalog_file=tmp_path / "none.json")
    run = tmp_path / "run"
    last = write_fake_card(run / "last", LABELS)
    assert card_folder(run) == cardschema.resolve(run) == last
    entry = catalog.find(str(run))
    assert entry.usable and entry.path == last and cardschema.read_meta(cardschema.resolve(run)) == entry.meta
    best = write_fake_card(run / "best", LABELS)
    assert card_folder(run) == cardschema.resolve(run) == catalog.find(str(run)).path == best

    meta = json.loads((best / "model.json").read_text())
    meta["preprocessing"]["spacing"] = [0.01, 1, 1]  # out of the schema's range
    (best / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as cli:
        cardschema.read_meta(cardschema.resolve(run))
    with pytest.raises(LoGoNetError) as slicer_side:
        catalog.find(str(run))
    assert str(slicer_side.value) == str(cli.value) and "preprocessing.spacing" in str(cli.value)


def test_a_pretraining_card_is_listed_as_unusable_for_segmentation(tmp_path):
    from LoGoNetLib.catalog import ModelCatalog

    backbone = write_fake_card(tmp_path / "home" / "models" / "backbone", [])
    meta = json.loads((backbone / "model.json").read_text())
    meta["architecture"]["out_channels"] = 48  # a feature width, as pretrain writes it
    (backbone / "model.json").write_text(json.dumps(meta))
    entry = next(e for e in ModelCatalog(home=tmp_path / "home", catalog_file=tmp_path / "none.json").models()
                 if e.id == "backbone")
    assert not entry.usable and "without organ labels" in entry.error and "fine-tune" in entry.error
