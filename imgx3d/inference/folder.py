"""Batch prediction: every case of files and folders into an output folder, safely.

Cases are claimed with lock files (two processes may share a folder), read ahead and written
behind the model on threads, written atomically (never half-written under a final name), and
skipped when their output exists, so an interrupted run finishes the rest when run again.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from imgx3d.config import DataConfig, from_dict
from imgx3d.data.io import (
    check_exists,
    is_image_path,
    is_volume_path,
    read_label,
    strip_suffix,
    write_image2d,
    write_nifti,
)
from imgx3d.data.labels import LabelCodec
from imgx3d.errors import InputError
from imgx3d.evaluation.plots import overlay_montage
from imgx3d.evaluation.uncertainty import case_uncertainty
from imgx3d.files import atomic_write_text, csv_text
from imgx3d.inference.predictor import Prediction, Predictor
from imgx3d.interrupts import raise_if_requested, requested
from imgx3d.progress import CaseProgress, on_terminal


UNCERTAINTY_TABLE = "uncertainty.csv"  # predict --uncertainty: the folder's cases, most unsure first


def uncertainty_path(output: Path, case_id: str) -> Path:
    """Where a case's uncertainty maps go (``predict --uncertainty``)."""
    return output / f"{case_id}_uncertainty.nii.gz"


def prediction_path(output: Path, case_id: str, data_cfg: DataConfig) -> Path:
    """Where a case's label map goes: ``<case>.png`` for 2D images, ``<case>.nii.gz`` for volumes."""
    return output / f"{case_id}{'.png' if data_cfg.mode == 'image' else '.nii.gz'}"


def write_prediction(prediction: Prediction, path: Path, codec: LabelCodec,
                     probabilities_path: Path | None = None) -> None:
    """Write a prediction's label map in the dataset's own file values (``data.label_map`` /
    ``mask_threshold`` undone), as a PNG for 2D images or a NIfTI on the input's grid, and its
    probabilities (``(X, Y, Z, K)`` float32 NIfTI) to ``probabilities_path`` when given."""
    values = codec.to_file(prediction.labels.array)
    if path.suffix == ".png":
        write_image2d(values, path)
    else:
        write_nifti(values, path, prediction.labels, dtype=codec.file_dtype)
    if probabilities_path is not None and prediction.probabilities is not None:
        write_nifti(np.moveaxis(prediction.probabilities.array, 0, -1), probabilities_path, prediction.probabilities,
                    dtype=np.float32)


def resolve_inputs(inputs: list[str | Path], data_cfg: DataConfig, in_channels: int) -> list[tuple[str, list[Path]]]:
    """Turn ``--input`` files/folders into cases ``(case_id, channel files)``.

    Single-channel models (and runs trained on 2D images): every volume file (or DICOM series
    folder), or every 2D image, is a case.
    Multi-channel models: nnU-Net style ``CASE_0000`` … files are grouped; folders of case
    folders are matched with ``data.channels``; a 4D NIfTI is one case.
    """
    cases: list[tuple[str, list[Path]]] = []
    for item in inputs:
        path = Path(item)
        check_exists(path, "check --input")
        if path.is_file():
            cases.append((strip_suffix(path.name), [path]))
            continue
        wanted = is_image_path if data_cfg.mode == "image" else is_volume_path
        files = sorted(p for p in path.iterdir() if p.is_file() and wanted(p) and not p.name.startswith("."))
        if data_cfg.mode == "image":
            cases += [(strip_suffix(p.name), [p]) for p in files]
        elif in_channels > 1 and data_cfg.channels:
            from imgx3d.data.catalog import find_cases

            cfg = from_dict(DataConfig, {"layout": "cases", "channels": data_cfg.channels,
                                         "labels": {0: "background", 1: "x"}})
            cases += [(c.case_id, c.images) for c in find_cases(path, cfg).cases]
        elif in_channels > 1 and any(strip_suffix(p.name)[-5:-4] == "_" for p in files):
            groups: dict[str, list[Path]] = {}
            for p in files:
                groups.setdefault(strip_suffix(p.name)[:-5], []).append(p)
            cases += sorted(groups.items())
        elif files:
            cases += [(strip_suffix(p.name), [p]) for p in files]
        elif any(p.is_file() for p in path.iterdir()):
            cases.append((path.name, [path]))  # a DICOM series folder
    if not cases:
        kinds = "2D images (.png/.jpg/.tif/.gif/.bmp)" if data_cfg.mode == "image" else \
            "input volumes (.nii/.nii.gz/.nrrd/.mha or DICOM folders)"
        raise InputError(f"{', '.join(map(str, inputs))}: no {kinds} found")
    ids = [c for c, _ in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"--input: two inputs share the case name '{dup[0]}'; rename one so outputs do not collide")
    return cases


def check_output_folder(output: Path, inputs: list[str | Path]) -> None:
    """Refuse to write into (or below) an input folder, or next to input files."""
    out = Path(os.path.realpath(output))
    for item in inputs:
        check_exists(Path(item), "check --input")
        path = Path(os.path.realpath(item))
        folder = path if path.is_dir() else path.parent
        if out == folder or (path.is_dir() and folder in out.parents):
            raise InputError(f"{output}: is inside the input folder {folder}; choose an --output folder outside the inputs")


class _Pipeline:
    """Reading ahead and writing behind the model: ``workers`` reader threads (0: everything in
    the calling thread, in order) and one writer thread. Results and errors come back in order."""

    def __init__(self, workers: int):
        self.readers = ThreadPoolExecutor(workers) if workers > 0 else None
        self.writer = ThreadPoolExecutor(1) if workers > 0 else None
        self.writes: list = []

    def read(self, fn, *args):
        """Start ``fn(*args)``; returns a callable that gives its result (or raises its error)."""
        if self.readers is None:
            return lambda: fn(*args)
        future = self.readers.submit(fn, *args)
        return future.result

    def write(self, fn, *args, done) -> None:
        """Run ``fn(*args)`` behind the model, then ``done()`` (also when it fails)."""
        def run():
            try:
                fn(*args)
            finally:
                done()
        if self.writer is None:
            run()
        else:
            self.writes.append(self.writer.submit(run))

    def drain(self) -> None:
        """Wait for every write; the first write error is raised."""
        writes, self.writes = self.writes, []
        for future in writes:
            future.result()

    def __enter__(self) -> "_Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        for pool in (self.readers, self.writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


LOCK_GRACE_S = 10.0  # a lock file without a PID yet is its creator's for this long


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only; PermissionError means it exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def claim_case(output: Path, case_id: str) -> Path | None:
    """Take ``output/.<case>.lock`` (atomic create) for this process; None while another live
    process holds it. A lock whose process died is taken over."""
    lock = output / f".{case_id}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text, age = lock.read_text(encoding="utf-8").strip(), time.time() - lock.stat().st_mtime
            except OSError:  # released meanwhile
                continue
            if (text.isdigit() and _alive(int(text))) or (not text and age < LOCK_GRACE_S):
                return None
            lock.unlink(missing_ok=True)  # its process died mid-case
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return lock
    return None


def predict_to_folder(predictor: Predictor, inputs: list[str | Path], output: str | Path, overwrite: bool = False,
                      probabilities: bool = False, overlay_dir: str | Path | None = None,
                      workers: int = 0, part: tuple[int, int] = (0, 1), uncertainty: bool = False) -> list[Path]:
    """Predict every input case into ``output/<case>.nii.gz`` (``.png`` for 2D images); with
    ``overlay_dir``, also a contour montage ``<case>.png`` of each newly predicted case there.

    With ``workers`` > 0, that many threads read and preprocess the next cases while the model
    predicts, and a writer thread saves results behind it (same outputs as ``workers=0``).
    Safe to interrupt and to share: outputs are written atomically (never half-written under
    their final name), existing ones are skipped, so a restarted run finishes the rest; a case
    another live process is predicting into the same folder is waited for, not redone.

    ``uncertainty``: also ``<case>_uncertainty.nii.gz`` (predictive entropy, and the mutual information
    of the members when several are averaged; :mod:`imgx3d.inference.uncertainty`) and the folder's
    ``uncertainty.csv``, the cases sorted by how unsure the prediction is, most unsure first.

    ``part = (k, n)``: only every n-th case (in case-id order) starting at the k-th, nnU-Net's
    ``-part_id / -num_parts``: n processes, machines or jobs of an array each predict one part of
    the same folder, and together write exactly what one process would.
    """
    output = Path(output)
    check_output_folder(output, inputs)
    k, n = part
    cases = sorted(resolve_inputs(inputs, predictor.config.data, predictor.in_channels))[k::n]
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{output}: cannot create the output folder ({err.strerror}); choose a writable --output") from None
    job = _FolderJob(predictor, output, probabilities, Path(overlay_dir) if overlay_dir is not None else None,
                     uncertainty)
    pending = [(case_id, paths, overwrite) for case_id, paths in cases]
    # a bar on a terminal, else one line per case (a log file, a pipe, a batch job)
    with tqdm(total=len(cases), desc="predict", unit="case", disable=not on_terminal(sys.stderr)) as job.bar, \
            _Pipeline(workers) as pipe:
        job.lines = CaseProgress("predict" if n == 1 else f"predict part {k}/{n}", len(cases), enabled=job.bar.disable)
        while pending:
            busy = job.one_pass(pending, pipe, workers)
            raise_if_requested(f"{len(job.done)} of {len(cases)} case(s) are in {output}, each complete; run the "
                               "same command again to predict the rest")
            if busy:
                time.sleep(0.5)
            pending = busy
    if uncertainty:
        job.write_uncertainty_table()
    return [job.done[case_id] for case_id, _ in cases]


class _FolderJob:
    """One ``predict_to_folder`` call: which cases are done, and one pass over the pending ones."""

    def __init__(self, predictor: Predictor, output: Path, probabilities: bool, overlay_dir: Path | None,
                 uncertainty: bool = False):
        self.predictor, self.output, self.probabilities, self.overlay_dir = predictor, output, probabilities, overlay_dir
        self.uncertainty = uncertainty
        self.members: dict[str, int] = {}  # members averaged per case predicted here (0: an earlier run's)
        self.done: dict[str, Path] = {}
        self.bar: Any = None
        self.lines: CaseProgress | None = None

    def write(self, case_id: str, target: Path, prediction: Prediction, image: np.ndarray) -> None:
        """The label map, the probabilities when asked for, and the overlay when asked for."""
        write_prediction(prediction, target, self.predictor.codec,
                         self.output / f"{case_id}_probabilities.nii.gz" if self.probabilities else None)
        if prediction.uncertainty is not None:
            self.members[case_id] = prediction.members
            maps = prediction.uncertainty.array
            write_nifti(maps[0] if len(maps) == 1 else np.moveaxis(maps, 0, -1), uncertainty_path(self.output, case_id),
                        prediction.uncertainty, dtype=np.float32)
        if self.overlay_dir is not None:
            overlay_montage(image, prediction.labels.array, self.predictor.labels, self.overlay_dir / f"{case_id}.png",
                            title=case_id)

    def write_uncertainty_table(self) -> None:
        """``uncertainty.csv``: every case with an uncertainty map in the folder, most unsure first (cases
        written earlier by an interrupted or another process included: their maps are the record)."""
        rows = []
        for case_id, target in self.done.items():
            path = uncertainty_path(self.output, case_id)
            if not path.is_file():
                continue
            maps = np.asarray(nib.load(path).dataobj, dtype=np.float32)
            labels = read_label(target, self.predictor.config.data)
            score = case_uncertainty(maps[..., 0] if maps.ndim == 4 else maps, labels.array != 0,
                                     self.predictor.method.num_classes, float(np.prod(labels.spacing)) / 1000,
                                     self.members.get(case_id, 0))
            rows.append({"case": case_id, **score.to_json(), "map": path.name})
        rows.sort(key=lambda r: (-r["foreground_entropy"], -r["uncertain_ml"], r["case"]))
        atomic_write_text(self.output / UNCERTAINTY_TABLE,
                          csv_text(["case", "foreground_entropy", "uncertain_ml", "members", "map"], rows))

    def _finish(self, case_id: str, target: Path, note: str = "") -> None:
        self.done[case_id] = target
        self.bar.update()
        if self.lines is not None:
            self.lines.advance(note=f"{case_id}{note}")

    def _predict_next(self, ahead: collections.deque, pipe: "_Pipeline") -> None:
        case_id, target, lock, loaded = ahead.popleft()
        try:
            case = loaded()
            prediction = self.predictor.predict_case(case, self.probabilities, self.uncertainty)
        except BaseException:
            lock.unlink(missing_ok=True)
            raise
        pipe.write(self.write, case_id, target, prediction, case.source.array[0],
                   done=lambda: lock.unlink(missing_ok=True))
        self._finish(case_id, target)

    def one_pass(self, pending: list[tuple[str, list[Path], bool]], pipe: "_Pipeline",
                 workers: int) -> list[tuple[str, list[Path], bool]]:
        """Predict every pending case this process can claim (reading ``workers`` ahead); returns the
        cases another live process holds, to wait for."""
        busy: list[tuple[str, list[Path], bool]] = []
        ahead: collections.deque = collections.deque()  # claimed cases whose reading has started
        try:
            for case_id, paths, redo in pending:
                if requested() is not None:  # stop claiming cases; the ones read ahead are dropped
                    break
                target = prediction_path(self.output, case_id, self.predictor.config.data)
                if target.exists() and not redo:
                    self._finish(case_id, target, ": already there")
                    continue
                lock = claim_case(self.output, case_id)
                if lock is None:  # another process is on it: its result will do
                    busy.append((case_id, paths, False))
                    continue
                ahead.append((case_id, target, lock, pipe.read(self.predictor.read, paths)))
                if len(ahead) > workers:
                    self._predict_next(ahead, pipe)
            while ahead and requested() is None:
                self._predict_next(ahead, pipe)
        finally:
            for _, _, lock, _ in ahead:
                lock.unlink(missing_ok=True)
            pipe.drain()
        return busy
