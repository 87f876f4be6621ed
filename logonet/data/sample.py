"""The sample CTs: ``logonet sample [--dest DIR]`` / :func:`fetch_sample`.

The TotalSegmentator source distribution on PyPI (``totalsegmentator==2.18.0``, Apache-2.0) ships real CT
test volumes. They are fetched with pip itself (no URL in this code; pip's index settings and proxy apply),
the archive's sha256 is checked, only the reference files are extracted, and BTCV-schema label maps are
derived from the TotalSegmentator ids. Files land in the user cache (``$LOGONET_CACHE/sample`` if set, else
``~/.cache/logonet/sample`` or the platform's cache folder); a finished cache has a ``manifest.json``, so
the second call returns at once without pip.

The label maps are a model's output, not manual ground truth: good for demos, smoke and regression tests,
never for accuracy claims.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional

import SimpleITK as sitk

from ..atomic import sha256_file, write_json_atomic
from ..errors import UserError
from . import volumes
from .labels import BTCV_NAMES, totalseg_to_btcv

PACKAGE = "totalsegmentator"
VERSION = "2.18.0"
ARCHIVE_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_PREFIX = f"{PACKAGE}-{VERSION}/tests/reference_files/"
#: Paths below tests/reference_files/ that are extracted (a trailing "/" means the whole folder).
REFERENCE_FILES = ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "example_ct_dicom/",
                   "example_seg_dicom.nii.gz", "aorta_report/example_ct.nii.gz", "example_mr_sm.nii.gz",
                   "example_seg_mr.nii.gz")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: the MR slab and its label map (a second patient's anatomy for ``logonet synth``)

#: fetch_sample() keys -> path relative to the sample folder.
FILES: Dict[str, str] = {
    "ct": "example_ct.nii.gz",  # 122x101x112, 3 mm, abdomen/pelvis
    "ct_labels": "example_ct_btcv.nii.gz",  # BTCV values (12 of 13 organs; no esophagus), on the ct grid
    "ct_labels_totalseg": "example_seg_fast_force_split.nii.gz",  # TotalSegmentator ids
    "dicom": "example_ct_dicom",  # 20-slice DICOM CT series (folder)
    "dicom_labels": "example_seg_dicom_btcv.nii.gz",  # BTCV values, on the DICOM series' exact grid
    "dicom_labels_totalseg": "example_seg_dicom.nii.gz",  # TotalSegmentator ids (same voxels, y axis flipped)
    "ct_fine": "aorta_report/example_ct.nii.gz",  # 233x167x191, 1.5 mm
    "mr": "example_mr_sm.nii.gz",  # 117x91x20, 3 mm: an upper-abdominal MR slab of another patient
    "mr_labels_totalseg_mr": "example_seg_mr.nii.gz",  # TotalSegmentator "total_mr" ids (1-50), on the mr grid
}


def user_cache_dir() -> Path:
    """logonet's user cache folder: ``$LOGONET_CACHE``, else the platform's (``~/.cache/logonet`` on Linux).

    Everything cached lives in a subfolder of it: ``sample/`` (the sample CTs), ``engines/`` (exported networks,
    :mod:`logonet.engines`), ``logs/`` (crash logs)."""
    env = os.environ.get("LOGONET_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "logonet" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "logonet"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "logonet"


def default_cache_dir() -> Path:
    """``$LOGONET_CACHE/sample``, else the platform's user cache folder + ``logonet/sample``."""
    return user_cache_dir() / "sample"


def _paths(root: Path) -> Dict[str, str]:
    out = {key: str(root / rel) for key, rel in FILES.items()}
    out["root"] = str(root)
    return out


def cached_sample(dest: Optional[volumes.PathLike] = None) -> Optional[Dict[str, str]]:
    """The sample paths if a complete cache exists at ``dest`` (default cache folder), else None. No network."""
    root = Path(dest).expanduser() if dest is not None else default_cache_dir()
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("manifest_version") != MANIFEST_VERSION or manifest.get("sha256") != SHA256:
        return None
    paths = _paths(root)
    if not all(Path(paths[key]).exists() for key in FILES):
        return None
    return paths


def fetch_sample(dest: Optional[volumes.PathLike] = None, archive: Optional[volumes.PathLike] = None,
                 log=None) -> Dict[str, str]:
    """Make sure the sample CTs are on disk and return their paths (see :data:`FILES`; plus ``"root"``).

    dest: folder for the files (default :func:`default_cache_dir`). archive: an already downloaded
    ``totalsegmentator-2.18.0.tar.gz`` (also taken from ``$LOGONET_SAMPLE_ARCHIVE``) for offline machines.
    The second call finds the manifest and returns at once. Raises ``UserError`` when pip cannot download
    the archive (offline) or the checksum does not match.
    """
    root = Path(dest).expanduser() if dest is not None else default_cache_dir()
    found = cached_sample(root)
    if found is not None:
        return found
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the sample folder {root} ({error}); choose another with --dest or "
                        "set LOGONET_CACHE.") from error
    with _lock(root):
        found = cached_sample(root)  # another process may have finished while we waited
        if found is not None:
            return found
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=str(root)) as tmp:
            work = Path(tmp)
            archive = archive or os.environ.get("LOGONET_SAMPLE_ARCHIVE") or None
            if archive is not None:
                tarball = Path(archive).expanduser()
                if not tarball.is_file():
                    raise UserError(f"sample archive {tarball} does not exist; give the path of {ARCHIVE_NAME}.")
            else:
                tarball = _pip_download(work / "download", log)
            _verify(tarball)
            log(f"extracting the reference CTs to {root}")
            staged = work / "files"
            _extract(tarball, staged)
            _derive_btcv(staged)
            _publish(staged, root)
    found = cached_sample(root)
    if found is None:  # pragma: no cover - would be a bug in _publish
        raise UserError(f"the sample in {root} is incomplete after extraction; delete the folder and retry.")
    return found


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Serialise concurrent fetches (e.g. parallel test workers) with an advisory file lock where available."""
    try:
        import fcntl
    except ImportError:  # Windows: per-file atomic replaces keep concurrent fetches safe, just wasteful
        yield
        return
    with open(root / ".lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _pip_download(folder: Path, log) -> Path:
    """``python -m pip download --no-deps --no-binary totalsegmentator totalsegmentator==2.18.0 -d folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
               f"{PACKAGE}=={VERSION}", "-d", str(folder), "--disable-pip-version-check", "--no-input",
               "--retries", "2", "--timeout", "30"]
    log(f"downloading the sample CTs: {PACKAGE}=={VERSION} source archive (38 MB) from PyPI with pip ...")
    start = time.monotonic()
    tarball = folder / ARCHIVE_NAME
    result = _run_pip(command)
    if not tarball.is_file() and "metadata" in result.stdout.lower() and importlib.util.find_spec("setuptools"):
        # pip builds the sdist's metadata in an isolated env it must populate; retry with this env's setuptools.
        result = _run_pip(command + ["--no-build-isolation"])
    if not tarball.is_file():
        # pip may save the archive even if a later step (metadata build) fails; only a missing file is fatal.
        tail = "\n".join(result.stdout.strip().splitlines()[-6:])
        raise UserError(
            f"could not download the sample CTs ({PACKAGE}=={VERSION} from PyPI) with pip "
            f"(exit {result.returncode}):\n{tail}\n"
            "Check the internet connection (or pip's index/proxy settings) and run 'logonet sample' again. "
            f"On an offline machine, copy {ARCHIVE_NAME} (from 'pip download --no-deps --no-binary {PACKAGE} "
            f"{PACKAGE}=={VERSION}' on a connected one) and run 'logonet sample --archive PATH'."
        )
    log(f"downloaded {ARCHIVE_NAME} in {time.monotonic() - start:.1f} s")
    return tarball


def _run_pip(command: List[str]) -> "subprocess.CompletedProcess[str]":
    try:
        return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PIP_NO_INPUT": "1"})
    except OSError as error:
        raise UserError(f"cannot run pip ({error}); the sample CTs are fetched with "
                        f"'{sys.executable} -m pip'.") from error


def _verify(tarball: Path) -> None:
    actual = sha256_file(tarball)
    if actual != SHA256:
        raise UserError(f"{tarball.name} has sha256 {actual}, expected {SHA256}: the download is corrupt or not "
                        f"the pinned {PACKAGE}=={VERSION} source archive. Delete it and run 'logonet sample' again.")


def _wanted(relative: str) -> bool:
    return any(relative == item or (item.endswith("/") and relative.startswith(item) and "/" not in
                                    relative[len(item):]) for item in REFERENCE_FILES)


def _extract(tarball: Path, staged: Path) -> List[str]:
    """Copy only the reference files out of the archive (regular files, no path tricks)."""
    written: List[str] = []
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                if not member.isfile() or not member.name.startswith(_PREFIX):
                    continue
                relative = member.name[len(_PREFIX):]
                parts = PurePosixPath(relative).parts
                if not _wanted(relative) or any(p in ("", ".", "..") for p in parts):
                    continue
                target = staged.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                if source is None:
                    continue
                with source, open(target, "wb") as out:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        out.write(block)
                written.append(relative)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UserError(f"cannot extract {tarball} ({error}); delete it and run 'logonet sample' again.") from error
    missing = [f for f in REFERENCE_FILES if f.endswith("/") and not any(w.startswith(f) for w in written)
               or not f.endswith("/") and f not in written]
    if missing:
        raise UserError(f"{tarball.name} lacks the expected reference files {missing}")
    return written


def _derive_btcv(staged: Path) -> None:
    """Write BTCV-schema label maps: on the example CT's grid and on the DICOM series' exact grid."""
    ct = volumes.read_image(staged / FILES["ct"])
    seg = volumes.read_image(staged / FILES["ct_labels_totalseg"])
    if not volumes.same_geometry(ct, seg):
        raise UserError("the sample's example_seg_fast_force_split.nii.gz is not on the example CT's grid")
    volumes.write_labelmap(totalseg_to_btcv(sitk.GetArrayFromImage(seg)), ct, staged / FILES["ct_labels"], BTCV_NAMES)

    dicom = volumes.read_image(staged / FILES["dicom"])
    seg = volumes.read_image(staged / FILES["dicom_labels_totalseg"])
    # The NIfTI label map stores the same voxels with the y axis flipped: same grid once both are in LPS order.
    if not volumes.same_geometry(sitk.DICOMOrient(dicom, "LPS"), sitk.DICOMOrient(seg, "LPS")):
        raise UserError("the sample's example_seg_dicom.nii.gz does not cover the DICOM series' voxels")
    on_grid = volumes.resample_to_reference(seg, dicom)  # exact: a pure axis flip
    volumes.write_labelmap(totalseg_to_btcv(sitk.GetArrayFromImage(on_grid)), dicom, staged / FILES["dicom_labels"],
                      BTCV_NAMES)
    notice = (f"Files from the {PACKAGE}=={VERSION} source distribution on PyPI (tests/reference_files/), "
              "Apache-2.0, https://github.com/wasserth/TotalSegmentator.\n"
              "*_btcv.nii.gz: TotalSegmentator ids mapped to the BTCV 13-organ values by logonet.\n"
              "The label maps are a model's output, not manual ground truth.\n")
    (staged / "NOTICE.txt").write_text(notice, encoding="utf-8")


def _publish(staged: Path, root: Path) -> None:
    """Move every staged file into ``root`` (atomic per file), then write the manifest last."""
    files = sorted(p for p in staged.rglob("*") if p.is_file())
    for path in files:
        target = root / path.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    manifest = {"manifest_version": MANIFEST_VERSION, "source": f"{PACKAGE}=={VERSION} (sdist, PyPI)",
                "sha256": SHA256, "files": FILES,
                "contents": sorted(str(p.relative_to(staged).as_posix()) for p in files)}
    write_json_atomic(manifest, root / MANIFEST)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dest", metavar="DIR", default=None,
                        help="folder for the sample files (default: $LOGONET_CACHE/sample or the user cache folder)")
    parser.add_argument("--archive", metavar="PATH", default=None,
                        help=f"use an already downloaded {ARCHIVE_NAME} instead of pip (offline machines)")
    parser.add_argument("--json", action="store_true", help="print the paths as one JSON object")


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    paths = fetch_sample(args.dest, archive=args.archive)
    if args.json:
        print(json.dumps(paths))
        return 0
    print(f"sample CTs in {paths['root']} ({time.monotonic() - start:.1f} s):")
    for key in FILES:
        print(f"  {key:22s} {paths[key]}")
    return 0
