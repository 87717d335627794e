"""Docs are tests: every ```python block of docs/*.md runs, in order, per page.

The blocks of one page share one process (later blocks may use names from earlier ones, as a
reader running them top to bottom would), in a scratch directory, offline and on the CPU. A page
whose code fails names the block that broke. The library's own ``>>>`` examples are collected by
``pytest --doctest-modules lorapro_jax`` in the README's test command; the README's quickstart
by tests/test_readme.py, which also checks what it prints and writes.
"""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
  with open(page, encoding="utf-8") as handle:
    return BLOCK.findall(handle.read())


def page_script(blocks: list[str]) -> str:
  """One script running the blocks in order; a failure says which block (1-based) raised."""
  parts = ["import sys, traceback"]
  for number, block in enumerate(blocks, 1):
    parts.append(f"try:\n  exec(compile({block!r}, 'block {number}', 'exec'), globals())\n"
                 f"except BaseException:\n  traceback.print_exc()\n"
                 f"  sys.exit('block {number} failed')")
  return "\n".join(parts)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_page_code_runs(page, tmp_path):
  script = tmp_path / "page.py"
  script.write_text(page_script(python_blocks(page)))
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env=env)
  assert result.returncode == 0, (result.stdout[-2000:] + result.stderr[-4000:])


def test_blocks_are_found():
  """The extraction itself: a page with two blocks gives both, in order, verbatim."""
  text = "intro\n```python\na = 1\n```\nmore\n```python\nprint(a)\n```\n```bash\nls\n```\n"
  assert BLOCK.findall(text) == ["a = 1\n", "print(a)\n"]
