"""The kmm command line: help everywhere, one-line errors with exit status 2."""

import subprocess
import sys

import pytest

from keras_mm import cli


def _kmm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "keras_mm.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args", [[], ["data"], ["bench"]]
                         + [["data", job] for job in cli.DATA_JOBS]
                         + [["bench", b] for b in cli.BENCHES])
def test_help_everywhere(args):
    result = _kmm(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    if len(args) == 2 and args[0] == "data":
        assert "--runner=DataflowRunner" in result.stdout  # Beam options pass through


@pytest.mark.parametrize("args,needle", [
    (["data", "label-as-text", "--out", "x", "--no_such_flag=3"], "--no_such_flag"),
    (["data", "label-as-text", "--out", "x", "--source", "nope"], "invalid choice"),
    (["data", "label-as-text", "--out", "x", "--split_fractions", "1,2"], "split_fractions"),
    (["data", "label-as-text", "--source", "manifest", "--out", "x"], "needs --input"),
    (["data", "label-as-text", "--source", "manifest", "--input", "/no/such.jsonl",
      "--out", "x", "--classnames", "/no/names.txt"], "not found"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_give_one_line_errors(args, needle, tmp_path):
    result = _kmm(*args, cwd=tmp_path)
    assert result.returncode == 2
    err = [line for line in result.stderr.splitlines() if line.startswith(("kmm", "usage"))]
    assert any(needle in line for line in err), result.stderr
    assert "Traceback" not in result.stderr


def test_label_as_text_prints_a_summary(tmp_path):
    result = _kmm("data", "label-as-text", "--source", "digits", "--limit", "60",
                  "--out", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    assert "== kmm data label-as-text ==" in result.stdout
    assert "written" in result.stdout and "dead_letters.total" in result.stdout
    assert (tmp_path / "d" / "stats.json").exists()
