"""Every code block in README.md runs as pasted.

A block preceded by ``<!-- not run: <reason> -->`` needs something a test
machine does not have (a real cloud account), or another test runs it; a
Python one is still compiled, so it stays valid Python. Every other Python or
bash block is written to a file and run in a fresh process in an empty home
folder, exactly as a user pasting it would; a TOML block is a config file
whose every profile must resolve.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```(?P<lang>\w+)\n(?P<code>.*?)^```", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>[^>]*?)\s*-->\s*$")


@dataclass
class Block:
    line: int
    lang: str
    code: str
    not_run: str | None


def readme_blocks(text: str) -> list[Block]:
    """The README's fenced blocks, each with its first line, language and not-run reason, if any."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        marker = _NOT_RUN.search(before[-1]) if before else None
        blocks.append(
            Block(
                line=text.count("\n", 0, match.start()) + 1,
                lang=match["lang"],
                code=match["code"],
                not_run=marker and marker["reason"],
            )
        )
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_runnable_blocks() -> None:
    assert sum(b.not_run is None and b.lang == "python" for b in BLOCKS) >= 2
    assert any(b.not_run is None and b.lang == "bash" for b in BLOCKS)
    for block in BLOCKS:
        assert block.lang in ("python", "bash", "toml"), f"README.md:{block.line}: no test runs {block.lang} blocks"
        if block.not_run is not None:
            assert block.not_run, f"README.md:{block.line}: say why the block is not run"


def test_marker_parsing_honours_only_the_line_right_before() -> None:
    text = "<!-- not run: needs AWS -->\n```python\nx = 1\n```\n\ntext\n```bash\ny = 2\n```\n"
    blocks = readme_blocks(text)
    assert [(b.line, b.lang, b.not_run) for b in blocks] == [(2, "python", "needs AWS"), (7, "bash", None)]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}-{b.lang}" for b in BLOCKS])
@pytest.mark.timeout(300)
def test_readme_block(block: Block, tmp_path: Path) -> None:
    if block.lang == "python":
        compile(block.code, f"README.md:{block.line}", "exec")
    if block.not_run is not None:
        pytest.skip(f"README.md:{block.line} is marked not run: {block.not_run}")
    if block.lang == "toml":
        _check_config(block, tmp_path)
        return
    if block.lang == "bash" and shutil.which("cloudexec") is None:
        pytest.skip("the cloudexec console script is not on PATH (pip install -e .)")
    home = tmp_path / "home"
    home.mkdir()
    script = tmp_path / ("snippet.py" if block.lang == "python" else "snippet.sh")
    script.write_text(block.code, encoding="utf-8")
    argv = [sys.executable, str(script)] if block.lang == "python" else ["bash", "-euo", "pipefail", str(script)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDEXEC_") and k != "XDG_CACHE_HOME"}
    env["HOME"] = str(home)
    # Run where a user would: in the clone, whose node_modules holds Azurite for the Azure emulator.
    proc = subprocess.run(argv, cwd=README.parent if block.lang == "python" else home, capture_output=True,
                          text=True, timeout=280, env=env)
    assert proc.returncode == 0, f"README.md:{block.line} failed:\n{proc.stdout}\n{proc.stderr}"


def _check_config(block: Block, tmp_path: Path) -> None:
    """A README config file: every profile resolves to a provider and its executor's arguments."""
    from cloudexec.cli import load_config

    path = tmp_path / "config.toml"
    path.write_text(block.code, encoding="utf-8")
    data = tomllib.loads(block.code)
    assert data.get("profiles"), f"README.md:{block.line}: a config without profiles"
    for name, table in data["profiles"].items():
        config = load_config(config_path=str(path), profile=name, environ={})
        assert config.provider == table["provider"]
        assert set(config.options) == set(table) - {"provider"}
