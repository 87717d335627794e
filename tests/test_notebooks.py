"""The Colab notebooks: in sync with notebooks/build.py, stripped, and running top to bottom.

Each notebook is executed by nbclient in a fresh kernel with ``LORAPRO_NOTEBOOK_TINY=1`` (its
``parameters`` cell then picks tiny sizes; everything is offline: the pretrained MiniLM-L6 and the
VADER lexicon ship as packages). A notebook passes when no cell raises — its last cell asserts the
outcome the notebook is about — it drew at least one inline plot, and its last cell ended by
printing the "OK:" line that follows its assertions.
"""
import importlib.util
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), "..", "notebooks")
_spec = importlib.util.spec_from_file_location("notebooks_build",
                                               os.path.join(NOTEBOOK_DIR, "build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
NAMES = list(build.NOTEBOOKS)
COLAB = "https://colab.research.google.com/github/lorapro-jax/lorapro_jax/blob/main/notebooks/{}.ipynb"


def _read(name):
  return nbformat.read(build.path_of(name), as_version=4)


def _code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_four_notebooks_exist():
  assert NAMES == ["01_quickstart", "02_lora_vs_lorapro", "03_dynamic_rank", "04_scaling_out"]
  assert sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb")) == [
      f"{name}.ipynb" for name in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_build_script(name):
  with open(build.path_of(name), encoding="utf-8") as handle:
    assert handle.read() == build.render(name), f"run python notebooks/build.py ({name} is stale)"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_layout(name):
  notebook = _read(name)
  nbformat.validate(notebook)
  first = notebook.cells[0]
  assert first.cell_type == "markdown" and COLAB.format(name) in first.source
  code = _code_cells(notebook)
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, "outputs must be stripped in git"
  install = next(cell for cell in code if "pip" in cell.source)
  assert 'find_spec("google.colab")' in install.source and 'find_spec("lorapro_jax")' in install.source
  assert "jax.devices()" in install.source
  parameters = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
  assert len(parameters) == 1 and "LORAPRO_NOTEBOOK_TINY" in parameters[0].source
  assert re.search(r"^\s*assert ", code[-1].source, re.M), "the last cell must assert the outcome"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_tiny(name, tmp_path, monkeypatch):
  monkeypatch.setenv("LORAPRO_NOTEBOOK_TINY", "1")
  notebook = _read(name)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  code = _code_cells(notebook)
  images = [output for cell in code for output in cell.outputs
            if "image/png" in output.get("data", {})]
  assert images, f"{name} drew no inline plot"
  printed = "".join(output.get("text", "") for output in code[-1].outputs).strip().splitlines()
  assert printed and printed[-1].startswith("OK:"), f"{name}'s last cell printed {printed!r}"
