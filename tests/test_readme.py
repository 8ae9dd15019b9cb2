"""What the README shows still works as shown: its two commands are the ones CI runs, every ``imgx3d``
command parses with the CLI, every Python call binds to the API's signature, and every link resolves.

The commands themselves run elsewhere: ``imgx3d demo`` in test_demo.py, ``train --budget`` without a
config in test_race.py, predict / evaluate / compare in test_integration.py and test_compare.py.
"""

import inspect
import re
import shlex
from pathlib import Path

import pytest

import imgx3d
from imgx3d.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
COMMANDS = [line.split("#")[0].strip() for lang, block in BLOCKS if lang in ("bash", "")
            for line in block.splitlines() if line.strip().startswith("imgx3d ")]


def test_the_readme_stays_a_readme():
    assert len(README.splitlines()) <= 250


def test_ci_runs_exactly_the_readmes_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    shell = "\n".join(block for lang, block in BLOCKS if lang in ("bash", ""))
    install = re.search(r"^(pip install [^&\n]+?)\s*(&&|$)", shell, flags=re.M).group(1).strip()
    assert install in ci
    assert "python -m pytest -q" in shell and "python -m pytest -q" in ci


@pytest.mark.parametrize("command", COMMANDS)
def test_every_imgx3d_command_of_the_readme_parses(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == shlex.split(command)[1]


def test_the_readme_shows_commands_at_all():
    assert {c.split()[1] for c in COMMANDS} >= {"train", "predict", "evaluate", "compare"}


def test_every_python_call_of_the_readme_binds_to_the_api():
    code = "\n".join(block for lang, block in BLOCKS if lang == "python")
    imported = re.search(r"from imgx3d import ([\w, ]+)", code).group(1).replace(" ", "").split(",")
    for name in imported:
        assert hasattr(imgx3d, name), f"the README imports imgx3d.{name}, which does not exist"
    for name, call in re.findall(r"\b(plan|train)\((.*?)\)(?:\.|\s|$)", code):
        positional = [a for a in call.split(",") if "=" not in a]
        keywords = {k.strip(): None for k, _ in (a.split("=") for a in call.split(",") if "=" in a)}
        inspect.signature(getattr(imgx3d, name)).bind(*positional, **keywords)
    assert "Predictor.load(" in code and hasattr(imgx3d.Predictor, "load") and hasattr(imgx3d.Predictor, "predict")


def test_every_relative_link_of_the_readme_exists():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing, missing
