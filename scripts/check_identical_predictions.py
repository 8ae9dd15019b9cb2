"""Are ``imgx3d predict``'s outputs byte-identical across a code change?

Drives only the command line (``python -m imgx3d``), so the same script runs on the code
before and after a refactor:

1. ``--record DIR`` (on the old code): trains short, seeded U-Net and ImgX runs on the
   hippocampus split of ``benchmarks/hippocampus.py`` (the shipped configs, a few
   hundred steps: the weights need not be good, only fixed), predicts their 40 test cases
   with ``imgx3d predict`` (probabilities too) and records each output file's SHA-256.
2. ``--check DIR`` (on the new code): predicts again from the same run folders (their
   checkpoints were written by the old code) and compares every file with the record.

Prints one JSON line per method: files compared, files identical, and the first differing
files. Exit code 1 when any file differs.

Usage:
    python scripts/check_identical_predictions.py --record /tmp/ident
    python scripts/check_identical_predictions.py --check /tmp/ident
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"unet": ["train.max_steps=200"], "imgx": ["train.max_steps=100"]}
COMMON = ["train.max_minutes=0", "train.schedule_over=steps", "train.val_every=100", "train.checkpoint_every=100", "train.val_cases=2",
          "data.num_workers=0"]


def _imgx3d(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "imgx3d", *args], check=True, cwd=ROOT)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.nii.gz"))}


def _predict(run: Path, data: Path, output: Path) -> dict[str, str]:
    split = json.loads((run / "split.json").read_text())
    cases = json.loads((data / "dataset.json").read_text())["training"]
    images = {Path(c["image"]).name.split(".")[0]: data / c["image"] for c in cases}
    inputs = [str(images[case]) for case in split["test"]]
    _imgx3d("predict", "--run", str(run), "--input", *inputs, "--output", str(output), "--probabilities",
            "--overwrite", "--device", "cpu")
    return _digests(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="train the runs and record their predictions here")
    mode.add_argument("--check", type=Path, help="predict again from the recorded runs and compare")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    args = parser.parse_args()
    work = (args.record or args.check).resolve()
    failed = False
    for method, overrides in METHODS.items():
        run = work / "runs" / method
        if args.record:
            _imgx3d("train", "--volume", "--config", f"configs/hippocampus/{method}.yaml", "--data", str(args.data),
                    "--run-dir", str(run), "--no-track", *COMMON, *overrides)
            record = _predict(run, args.data, work / "before" / method)
            (work / f"{method}.sha256.json").write_text(json.dumps(record, indent=1))
            print(json.dumps({"method": method, "recorded": len(record)}), flush=True)
            continue
        record = json.loads((work / f"{method}.sha256.json").read_text())
        now = _predict(run, args.data, work / "after" / method)
        differ = sorted(name for name in record if now.get(name) != record[name])
        failed |= bool(differ) or set(now) != set(record)
        print(json.dumps({"method": method, "files": len(record), "identical": len(record) - len(differ),
                          "differ": differ[:5]}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
