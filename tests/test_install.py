"""Installing swarmtrain as README.md and the systemd unit say, on a fresh machine, and building it quietly."""
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO

README = REPO / "README.md"
UNIT = REPO / "deploy" / "swarmtrain-peer.service"
WARNINGS = re.compile(r"warning|!!", re.IGNORECASE)


def _pip_lines(text: str) -> list:
    return [line for line in text.splitlines() if "Location 'file:" not in line]  # this machine's pip config


def _copy_of_the_repository(destination: Path) -> Path:
    """The tracked files as they are now (a clone would miss uncommitted edits)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def _fresh_venv(path: Path) -> Path:
    """A new venv with pip upgraded, as `make setup` does (older pips hide the build backend's warnings)."""
    venv.EnvBuilder(with_pip=True).create(path)
    _run([path / "bin" / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip"], cwd=path)
    return path / "bin"


def _run(command, cwd, timeout=600, shell=False):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, shell=shell)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.timeout(300)
def test_building_and_installing_prints_no_setuptools_warnings(tmp_path):
    """`make setup` (an editable install) and `make dist` (a wheel) printed ~100 lines of setuptools
    warnings: swarmtrain.configs was importable but not declared as a package."""
    clone = _copy_of_the_repository(tmp_path / "clone")
    bin_dir = _fresh_venv(tmp_path / "venv")
    editable = _run([bin_dir / "pip", "install", "--quiet", "--no-deps", "-e", "."], cwd=clone)
    assert not [line for line in _pip_lines(editable.stdout + editable.stderr) if WARNINGS.search(line)], \
        editable.stderr[-3000:]
    make = _run(["make", "dist", f"PYTHON={bin_dir / 'python'}"], cwd=clone)
    assert not [line for line in _pip_lines(make.stdout + make.stderr) if WARNINGS.search(line)], make.stderr[-3000:]
    [wheel] = (clone / "dist").glob("swarmtrain-*.whl")
    assert f"pip install {wheel.name}" in README.read_text(), "the README names another wheel than `make dist` builds"
    names = zipfile.ZipFile(wheel).namelist()
    for config in (REPO / "swarmtrain" / "configs").glob("*.yaml"):
        assert f"swarmtrain/configs/{config.name}" in names
    packages = {str(path.parent.relative_to(REPO)) for path in (REPO / "swarmtrain").rglob("*.py")}
    assert packages <= {name.rsplit("/", 1)[0] for name in names}, packages
    assert not [name for name in names if "__pycache__" in name or name.startswith(("tests/", "benchmarks/"))]


def _readme_install_line() -> str:
    lines = [line.strip() for line in README.read_text().splitlines() if line.strip().startswith("pip install ./")]
    assert len(lines) == 1, lines
    return lines[0]


def _unit_install_lines() -> list:
    """The unit's install commands (its indented comment lines; the prose above them names `make dist` too),
    for a venv of our own instead of /opt/swarmtrain and without sudo."""
    commands = [line.lstrip("#").strip() for line in UNIT.read_text().splitlines()
                if line.startswith("#   ") and ("make dist" in line or "/opt/swarmtrain/bin/pip install" in line)]
    assert len(commands) == 2, commands
    return commands


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_readme_and_unit_install_lines_work_on_a_fresh_machine(tmp_path):
    """`pip install swarmtrain` failed: the package is not on the index. The README's line, as written, in
    a clone and a fresh venv (torch pinned first, as `make setup` does: this machine's CPU build); then the
    systemd unit's lines: `make dist` and the wheel installed into a venv."""
    clone = _copy_of_the_repository(tmp_path / "clone")
    bin_dir = _fresh_venv(tmp_path / "venv")
    _run([bin_dir / "pip", "install", "--quiet", "torch==2.13.0"], cwd=clone, timeout=1200)
    line = _readme_install_line()
    _run(f"{bin_dir}/{line}", cwd=clone, timeout=1200, shell=True)
    version = _run([bin_dir / "swarmtrain", "--version"], cwd=tmp_path)
    assert "swarmtrain, version" in version.stdout
    make_dist, install_wheel = _unit_install_lines()
    _run(make_dist.split("#")[0].replace("make dist", f"make dist PYTHON={bin_dir / 'python'}"), cwd=clone, shell=True)
    install_wheel = install_wheel.replace("sudo ", "").replace("python3 -m venv /opt/swarmtrain", f"{sys.executable} -m venv "
                                                                                                  f"{bin_dir.parent}")
    _run(install_wheel.replace("/opt/swarmtrain", str(bin_dir.parent)), cwd=clone, shell=True)
    located = _run([bin_dir / "python", "-c", "import swarmtrain.configs, pathlib; print(swarmtrain.__file__); "
                    "print(sorted(p.name for p in pathlib.Path(swarmtrain.configs.__path__[0]).glob('*.yaml')))"],
                   cwd=tmp_path)
    assert "site-packages" in located.stdout and "tiny.yaml" in located.stdout, located.stdout
    _run([bin_dir / "swarmtrain", "peer", "--help"], cwd=tmp_path)


def _bash_blocks(text: str) -> list:
    return re.findall(r"```bash\n(.*?)```", text, re.DOTALL)


def test_readme_commands_can_be_pasted():
    """A `# comment` after a line-continuing backslash ends the command there: the next line then ran as
    a command of its own (`--max-memory: command not found`)."""
    from swarmtrain.cli import main

    for block in _bash_blocks(README.read_text()):
        lines = [line.strip() for line in block.splitlines()]
        for previous, line in zip([""] + lines, lines):
            assert not re.search(r"\\\s+\S", line), f"text after a line-continuing backslash: {line!r}"
            assert not (previous.endswith("\\") and line.startswith("#")), f"a comment inside a command: {line!r}"
        for command in _logical_commands(lines):
            words = command.split()
            if words[:1] != ["swarmtrain"] or len(words) < 2:
                continue
            group = main
            names = words[1:]
            while names and names[0] in getattr(group, "commands", {}):
                group, names = group.commands[names[0]], names[1:]
            known = {opt for param in group.params for opt in getattr(param, "opts", [])}
            unknown = [word for word in names if word.startswith("--") and word not in known]
            assert not unknown, f"README: `{command}` uses flags {unknown} that {group.name} does not have"


def _logical_commands(lines: list) -> list:
    """The commands a shell runs: continued lines joined, comments (a # after a space) dropped."""
    commands, current = [], ""
    for line in lines:
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            commands.append(re.sub(r"(^|\s)#.*", "", current).strip())
            current = ""
    return [command for command in commands if command]
