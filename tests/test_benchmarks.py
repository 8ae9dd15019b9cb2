"""The benchmarks package: every benchmark imports and is listed, its one child runner keeps order,
threads, logs and resumes, and the results page is what the recorded JSON lines render."""

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package lives beside imgx3d, not inside the installed package

from benchmarks import children, common, tables  # noqa: E402
from benchmarks.children import Child, module, run_children  # noqa: E402

SHARED = {"__init__", "children", "common", "synthesis", "tables"}
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in SHARED)


def test_every_benchmark_is_in_the_readme_table_and_every_row_is_a_benchmark():
    rows = set(re.findall(r"^\| `(\w+)` \|", (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8"), re.M))
    assert rows == set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_imports_and_has_a_main(name):
    mod = importlib.import_module(f"benchmarks.{name}")
    assert callable(getattr(mod, "main", None)), f"benchmarks/{name}.py has no main()"
    assert (mod.__doc__ or "").strip(), f"benchmarks/{name}.py has no docstring saying what it measures"


def test_no_benchmark_edits_sys_path_or_starts_processes_itself():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "sys.path" not in text, f"{path.name} edits sys.path"
        if path.name != "children.py":
            assert "subprocess.Popen" not in text and "subprocess.run(" not in text.replace(
                'subprocess.run(["git"', ""), f"{path.name} starts a process outside children.run_children"


def test_emit_stamps_every_line(capsys):
    common.emit("demo.figure", 0.5, "dice", cases=3)
    line = json.loads(capsys.readouterr().out)
    assert line["name"] == "demo.figure" and line["value"] == 0.5 and line["cases"] == 3
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", line["date"])
    assert line["commit"] and line["machine"]
    common.emit("demo.setup", None, "", machine=common.machine())
    setup = json.loads(capsys.readouterr().out)
    assert setup["machine_details"]["torch"] == torch.__version__ and isinstance(setup["machine"], str)


def _python(code: str) -> list[str]:
    return ["-c", code]


def test_children_run_in_order_with_their_threads_logs_and_the_repository_on_their_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: children still import the benchmarks package
    stamp = tmp_path / "order.txt"
    code = ("import os, sys, benchmarks.children; open({p!r}, 'a').write(sys.argv[1] + ' '); "
            "print(sys.argv[1], os.environ.get('OMP_NUM_THREADS'))")
    jobs = [Child("second", _python(code.format(p=str(stamp))) + ["second"], threads=3, after=["first"]),
            Child("first", _python("import time; time.sleep(0.5); " + code.format(p=str(stamp))) + ["first"],
                  threads=1),
            Child("alone", _python(code.format(p=str(stamp))) + ["alone"])]
    ran = run_children(jobs, parallel=2, logs=tmp_path / "logs")
    assert stamp.read_text().split().index("first") < stamp.read_text().split().index("second")
    assert ran["second"].output.strip() == "second 3" and ran["first"].output.strip() == "first 1"
    assert ran["second"].returncode == 0 and ran["second"].seconds > 0
    assert (tmp_path / "logs" / "second.log").read_text().strip() == "second 3"


def test_children_resume_skips_what_finished_and_a_failure_names_its_log(tmp_path):
    logs = tmp_path / "logs"
    counter = tmp_path / "count.txt"
    bump = _python(f"open({str(counter)!r}, 'a').write('x')")
    assert set(run_children([Child("a", bump)], logs=logs, resume=True)) == {"a"}
    assert run_children([Child("a", bump)], logs=logs, resume=True) == {}  # done: not run again
    assert counter.read_text() == "x"
    with pytest.raises(SystemExit, match=r"broken failed \(exit 3\); see .*broken\.log"):
        run_children([Child("broken", _python("import sys; print('why'); sys.exit(3)"))], logs=logs, resume=True)
    assert not (logs / "broken.done").exists()
    finished = run_children([Child("broken", _python("import sys; sys.exit(3)"))], check=False)
    assert finished["broken"].returncode == 3
    with pytest.raises(SystemExit, match="wait on children that never run"):
        run_children([Child("orphan", _python("pass"), after=["missing"])])


def test_a_child_benchmark_hands_its_json_line_back(tmp_path):
    ran = run_children([Child("emit", module("benchmarks.common"))])  # importable as a module: prints nothing
    assert ran["emit"].returncode == 0
    code = "from benchmarks.common import emit; emit('child.figure', 2, 's')"
    line = children.last_json(run_children([Child("c", _python(code))])["c"])
    assert line["name"] == "child.figure" and line["value"] == 2 and "commit" in line


def test_the_results_page_renders_the_recorded_lines_and_leaves_setup_lines_out(tmp_path):
    stamp = {"date": "2026-12-07", "commit": "abc1234", "machine": "x86_64, 2 cores, cpu, torch 2"}
    lines = [{"name": "demo.setup", "value": None, "unit": "", "machine_details": {"cpu": "x"}, **stamp},
             {"name": "demo.dice", "value": 0.87, "unit": "dice", "cases": 40, "per|pipe": [1, 2], **stamp}]
    (tmp_path / "demo.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    page = tables.render(tmp_path)
    assert "## demo" in page and "demo.setup" not in page
    row = next(r for r in page.splitlines() if r.startswith("| demo.dice"))
    assert row == ("| demo.dice | 0.87 | dice | cases: 40; per\\|pipe: [1, 2] | 2026-12-07 | abc1234 | "
                   "x86_64, 2 cores, cpu, torch 2 |")
    (tmp_path / "bad.jsonl").write_text('{"name": "x", "value": 1}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1: lacks date, commit, machine"):
        tables.render(tmp_path)


def test_the_results_page_in_docs_is_generated_from_the_recorded_results():
    assert (ROOT / "docs" / "benchmark-results.md").read_text(encoding="utf-8") == tables.render(), \
        "docs/benchmark-results.md is stale or edited by hand: run python -m benchmarks.tables"
