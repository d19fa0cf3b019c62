"""Every Python block in README.md runs as pasted.

A block preceded by ``<!-- not run: <reason> -->`` needs something a test
machine does not have (a real cloud account); it is still compiled, so it
stays valid Python. Every other block is written to a file and run with a
fresh interpreter, exactly as a user pasting it would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>[^>]*?)\s*-->\s*$")


@dataclass
class Block:
    line: int
    code: str
    not_run: str | None


def readme_blocks(text: str) -> list[Block]:
    """The README's python blocks, each with its first line and its not-run reason, if any."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        marker = _NOT_RUN.search(before[-1]) if before else None
        blocks.append(
            Block(line=text.count("\n", 0, match.start()) + 1, code=match.group(1), not_run=marker and marker["reason"])
        )
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_runnable_blocks() -> None:
    assert sum(b.not_run is None for b in BLOCKS) >= 2
    for block in BLOCKS:
        if block.not_run is not None:
            assert block.not_run, f"README.md:{block.line}: say why the block is not run"


def test_marker_parsing_honours_only_the_line_right_before() -> None:
    text = "<!-- not run: needs AWS -->\n```python\nx = 1\n```\n\ntext\n```python\ny = 2\n```\n"
    blocks = readme_blocks(text)
    assert [(b.line, b.not_run) for b in blocks] == [(2, "needs AWS"), (7, None)]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
@pytest.mark.timeout(300)
def test_readme_block(block: Block, tmp_path: Path) -> None:
    compile(block.code, f"README.md:{block.line}", "exec")
    if block.not_run is not None:
        pytest.skip(f"README.md:{block.line} is marked not run: {block.not_run}")
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    # Run where a user would: a folder of their own, the project's node_modules
    # reachable for the Azure emulator (it looks for Azurite from the cwd up).
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert proc.returncode == 0, f"README.md:{block.line} failed:\n{proc.stdout}\n{proc.stderr}"
