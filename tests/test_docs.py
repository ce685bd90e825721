"""docs/generate.py: the manual pages nbd-vram(8) and nbd-vram.conf(5) and the bash completion are
generated from nbd_vram.py (its option table, its argument parser, its exit codes) and checked in;
this checks that they are current, that groff renders them without a warning, and that the
completion completes."""
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, load_module

GENERATE = ROOT / "docs" / "generate.py"
MAN8, MAN5, COMPLETION = ROOT / "docs" / "nbd-vram.8", ROOT / "docs" / "nbd-vram.conf.5", ROOT / "docs" / "nbd-vram.bash-completion"


def test_generated_files_are_current():
    p = subprocess.run([sys.executable, str(GENERATE), "--check"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr + "\n(run docs/generate.py and commit what it writes)"


def test_check_names_a_stale_file(tmp_path):
    for f in (MAN8, MAN5, COMPLETION):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / MAN5.name).write_text(MAN5.read_text().replace("min_size", "minsize"))
    p = subprocess.run([sys.executable, str(GENERATE), "--check", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and str(tmp_path / MAN5.name) in p.stderr and MAN8.name not in p.stderr, p.stderr


@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
def test_pages_render_without_warnings(page):
    if not shutil.which("groff"):
        pytest.skip("groff is not installed (apt-get install groff-base)")
    p = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stderr, p.stderr
    text = subprocess.run(["groff", "-man", "-Tutf8", "-P", "-cbou", str(page)], capture_output=True, text=True, timeout=60).stdout
    assert "NAME" in text and "SEE ALSO" in text


def test_every_key_command_and_exit_code_is_documented():
    nv = load_module()
    man5 = MAN5.read_text()
    for o in nv.OPTIONS:
        assert f'.BI {o.key} " = " "' in man5, o.key
    man8 = MAN8.read_text()
    parser = nv.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = [c for c in sub.choices if c != "worker"]
    for c in commands:
        assert f"\n.B {c}" in man8, c
    for code in range(12):
        assert f"\n.B {code}\n" in man8, code
    completion = COMPLETION.read_text()
    for c in commands:
        assert f"        {c}) opts=" in completion, c
    for o in nv.OPTIONS:
        assert o.flag in completion, o.flag


def test_every_command_lists_its_exit_codes():
    """Each command's entry in nbd-vram(8) ends with the exit codes its --help lists."""
    nv = load_module()
    parser = nv.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    man8 = MAN8.read_text()
    names = [name for name in sub.choices if name != "worker"]
    starts = [man8.index(f"\n.TP\n.B {name}") for name in names] + [man8.index("\n.SH EXIT STATUS")]
    entries = {name: man8[start:end] for name, start, end in zip(names, starts, starts[1:])}
    for name in names:
        p = sub.choices[name]
        codes = [line.split()[0] for line in p.epilog.split("exit status:\n")[1].splitlines()]
        assert codes[:3] == ["0", "1", "2"], (name, codes)
        assert entries[name].endswith(f"\n.IP\nExit status: {', '.join(codes)} (see EXIT STATUS)."), name


def complete(*words):
    """What the completion offers after WORDS (the last one being completed)."""
    script = (f"source {COMPLETION}\nCOMP_WORDS=({' '.join(repr(w) for w in ('nbd_vram.py',) + words)})\n"
              f"COMP_CWORD={len(words)}\n_nbd_vram\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_completion_completes_commands_flags_and_values():
    assert complete("ru") == ["run"]
    assert complete("s") == ["serve", "status", "sleep", "shrink"]
    assert complete("run", "--pow") == ["--power", "--power-poll"]
    assert complete("run", "--power", "") == ["always", "ac", "battery"]
    assert complete("check-config", "--encrypt", "y") == ["yes"]
    assert complete("status", "") == ["--json", "--help"]
    assert complete("shrink", "--t") == ["--timeout"]


def test_ci_runs_the_readme_test_command():
    """.ci/run's last command is the README's test command, and the README gives it on its first screen."""
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index(next(l for l in readme if l.startswith("Run the tests")))
    command = next(l.strip() for l in readme[start:] if l.startswith("    python3 -m pytest"))
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ci[-1] == command, f".ci/run runs {ci[-1]!r}, the README says {command!r}"
    assert start < 40, "the test command is not on the README's first screen"


def test_tests_readme_names_every_test_file():
    """tests/README.md's table of files has a row for each test file, and none for a file that is gone."""
    text = (ROOT / "tests" / "README.md").read_text()
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    rows = {l.split("`")[1] for l in text.splitlines() if l.startswith("| `test_")}
    assert files - rows == set(), f"tests/README.md has no row for {sorted(files - rows)}"
    assert rows - files == set(), f"tests/README.md has rows for files that are gone: {sorted(rows - files)}"
