"""What a newcomer sees: results on stdout, diagnostics on stderr, one-line errors with distinct exit codes,
help that keeps its brackets, progress in a pipe, and no 80-column wrap when output is not a terminal."""

from __future__ import annotations

import io
import sys

import pytest
from conftest import ROOT
from rich.console import Console

from trtrag_cli.cli.common import EX_SOFTWARE, guarded
from trtrag_cli.cli.progress import Progress


def _one_line_error(result) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in result.output and err.startswith("error:") and "\n" not in err, result.output
    return err


@pytest.mark.parametrize("value", ["-1", "0"])
def test_ask_top_k_out_of_range_names_the_option(cli, make_recipe, value):
    res = cli("ask", "anything", "-k", value, "--recipe", make_recipe(), ok=False)
    err = _one_line_error(res)
    assert res.exit_code == 2 and err.startswith(f"error: --top-k {value}:") and "greater than or equal to 1" in err


def test_ask_unknown_mode_lists_the_valid_ones_on_one_unwrapped_line(cli, make_recipe):
    res = cli("ask", "anything", "--mode", "fuzzy", "--recipe", make_recipe(), ok=False)
    err = _one_line_error(res)  # longer than 80 columns, still one line
    assert res.exit_code == 2 and len(err) > 80 and "--mode fuzzy" in err and "'hybrid', 'rrf', 'bm25'" in err


def test_bad_option_values_of_other_commands(cli, make_recipe):
    res = cli("bench", "--vectors", "-5", "--dim", "8", ok=False)
    assert res.exit_code == 2 and "--vectors must be at least 0, got -5" in _one_line_error(res)
    res = cli("bench", "--vectors", "100", "--dim", "8", "--batch", "1,0", ok=False)
    assert res.exit_code == 2 and "--batch values must be at least 1" in _one_line_error(res)
    res = cli("calibrate", "--batch-size", "0", "--recipe", make_recipe(), ok=False)
    assert res.exit_code == 2 and "--batch-size 0: calibrate.batch_size must be greater than or equal to 1024" in _one_line_error(res)
    res = cli("calibrate", "--method", "median", "--recipe", make_recipe(), ok=False)
    assert res.exit_code == 2 and "'entropy', 'percentile' or 'max'" in _one_line_error(res)
    res = cli("eval", "--queries", "q.jsonl", "--modes", "bm25,fuzzy", "--recipe", make_recipe(), ok=False)
    assert res.exit_code == 2 and "hybrid, rrf, bm25, dense" in _one_line_error(res)
    res = cli("serve", "--port", "70000", "--recipe", make_recipe(), ok=False)
    assert res.exit_code == 2 and "0..65535" in _one_line_error(res)


def test_recipe_errors_stay_exit_1(cli, make_recipe):
    res = cli("ask", "anything", "--set", "retrieve.top_k=0", "--recipe", make_recipe(), ok=False)
    assert res.exit_code == 1 and "retrieve.top_k must be greater than or equal to 1" in _one_line_error(res)


def test_eval_help_keeps_its_brackets(cli, monkeypatch):
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    monkeypatch.setenv("COLUMNS", "200")
    out = cli("eval", "-h").stdout
    assert "{query, relevant: [source, ...]}" in out


def test_version(cli):
    from trtrag_cli.util.deps import version

    assert cli("--version").stdout.strip() == f"trtrag {version('trtrag')}"
    assert cli("ask", "--version").stdout.strip() == f"trtrag {version('trtrag')}"


def test_doctor_result_on_stdout_unwrapped(cli, make_recipe):
    """With no index yet, doctor still prints its report on stdout, then says on stderr what ask lacks."""
    recipe = make_recipe()
    report = cli.json("doctor", "--recipe", recipe, ok=False)
    res = cli("doctor", "--recipe", recipe, ok=False)
    assert res.exit_code == 1 and "stages" in res.stdout and "libraries" in res.stdout
    assert res.stderr.startswith("error: index: no index") and res.stderr.count("error:") == 1
    lines = res.stdout.splitlines()
    for stage in report["stages"].values():  # each reason whole on one line, brackets included
        assert any(stage["why"] in line for line in lines), stage["why"]


def test_bench_prints_tables_on_stdout_and_progress_on_stderr(cli, make_recipe):
    res = cli("bench", "--vectors", "2000", "--dim", "32", "--batch", "1,4", "--kinds", "", "--no-stage",
              "--reps", "5", "--recipe", make_recipe())
    assert "search: 2000 x 32 (synthetic clustered)" in res.stdout and "cpu faiss flat" in res.stdout
    assert "┃ engine" in res.stdout and "{'" not in res.output  # a table, not a Python dict
    assert "data: 2000 x 32 (synthetic clustered)" in res.stderr and "search:" not in res.stderr


def test_index_progress_lines_when_piped(cli, make_recipe, tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(12):
        (root / f"d{i}.txt").write_text(f"Document {i} is about sensor number {i} and its warranty. " * 20)
    res = cli("index", root, "--recipe", make_recipe(encoder={"batch_size": 4}))
    embed = [ln for ln in res.stderr.splitlines() if ln.startswith("embed: ")]
    assert embed and embed[-1].split()[1].split("/")[0] == embed[-1].split()[1].split("/")[1]  # done == total
    assert "(100%)" in embed[-1] and "chunks" in embed[-1]
    assert "indexed" in res.stdout and "indexed" not in res.stderr


def test_progress_lines_are_throttled_to_tenths():
    buf = io.StringIO()
    now = [0.0]
    with Progress(Console(file=buf, width=1000), clock=lambda: now[0], unit={"embed": "chunks"}) as progress:
        for done in range(1, 1001):
            now[0] += 0.001  # a whole phase in one second: only the tenths are due
            progress.update("embed", done, 1000)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 11 and lines[0].startswith("embed: 1/1000 chunks")
    assert [ln.split()[1] for ln in lines[1:]] == [f"{100 * i}/1000" for i in range(1, 11)]
    buf.truncate(0), buf.seek(0)
    with Progress(Console(file=buf, width=1000), clock=lambda: now[0]) as progress:
        for done in range(1, 4):
            now[0] += 6.0  # a slow phase: a line every 5 s even within one tenth
            progress.update("calibrate", done, 100)
    assert len(buf.getvalue().splitlines()) == 3


def test_a_crash_keeps_its_traceback_and_exits_70(monkeypatch, capsys, make_recipe):
    import trtrag_cli.doctor
    from trtrag_cli.cli.app import main

    def broken(recipe):
        raise RuntimeError("a bug in doctor")

    monkeypatch.setattr(trtrag_cli.doctor, "run_doctor", broken)
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", "--recipe", str(make_recipe())])
    assert exit_.value.code == EX_SOFTWARE
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in doctor" in err and "internal error" in err


def test_guarded_keeps_exit_codes_of_user_errors():
    def exits(code):
        raise SystemExit(code)

    assert guarded(lambda: exits(1)) == 1 and guarded(lambda: exits(2)) == 2 and guarded(lambda: None) == 0
    assert guarded(lambda: {}["missing"]) == EX_SOFTWARE


def test_a_missing_optional_package_is_one_line(cli, make_recipe, monkeypatch, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("".join(f"question {i}\n" for i in range(2000)))
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets where onnx is not installed
    res = cli("calibrate", "--queries", queries, "--recipe", make_recipe(), ok=False)
    err = _one_line_error(res)
    assert res.exit_code == 1 and "onnx is not installed" in err and "pip install 'trtrag[cpu]'" in err


def test_piped_subprocess_streams(make_recipe):
    """The real console script in a pipe: result on stdout, nothing else; an error on stderr only."""
    import subprocess

    recipe = make_recipe()
    ok = subprocess.run([sys.executable, "-m", "trtrag_cli", "doctor", "--recipe", str(recipe)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 1 and "stages" in ok.stdout and max(map(len, ok.stdout.splitlines())) > 80
    assert ok.stderr.startswith("error: index: no index")  # doctor's verdict: ask has nothing to search
    bad = subprocess.run([sys.executable, "-m", "trtrag_cli", "ask", "q", "-k", "-1", "--recipe", str(recipe)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.startswith("error: --top-k -1")
