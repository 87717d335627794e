"""The Colab notebooks: generated from their sources, stripped, and running top to bottom.

Each notebook is written as a jupytext ``py:percent`` source, ``notebooks/NAME.py``; the committed
``notebooks/NAME.ipynb`` is generated from it by this module (run it as a script to regenerate)
and must equal what the source generates. Every ``notebooks/*.py`` is a notebook.

Each notebook is executed by nbclient in a fresh kernel with ``LORAPRO_NOTEBOOK_TINY=1`` (its
``parameters`` cell then picks tiny sizes; everything is offline: the pretrained MiniLM-L6 and the
VADER lexicon ship as packages). A notebook passes when no cell raises — its last cell asserts the
outcome the notebook is about — it drew at least one inline plot, and its last cell ended by
printing the "OK:" line that follows its assertions.
"""
import glob
import os
import re

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "notebooks"))
NAMES = sorted(os.path.basename(path)[:-len(".py")]
               for path in glob.glob(os.path.join(NOTEBOOK_DIR, "*.py")))
COLAB = "https://colab.research.google.com/github/lorapro-jax/lorapro_jax/blob/main/notebooks/{}.ipynb"


def render(name: str) -> str:
  """The text of ``notebooks/{name}.ipynb`` as generated from ``notebooks/{name}.py``."""
  notebook = jupytext.read(os.path.join(NOTEBOOK_DIR, f"{name}.py"), fmt="py:percent")
  notebook.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"name": f"{name}.ipynb", "provenance": []},
  }
  for index, cell in enumerate(notebook.cells):
    cell.id = f"cell-{index:02d}"  # jupytext draws random ids: these keep regeneration a no-op
  nbformat.validate(notebook)
  return nbformat.writes(notebook) + "\n"


def _path(name):
  return os.path.join(NOTEBOOK_DIR, f"{name}.ipynb")


def _read(name):
  return nbformat.read(_path(name), as_version=4)


def _code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_every_notebook_has_its_source():
  assert {"01_quickstart", "02_lora_vs_lorapro", "03_dynamic_rank", "04_scaling_out"} <= set(NAMES)
  generated = sorted(os.path.basename(path)[:-len(".ipynb")]
                     for path in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
  assert generated == NAMES, "each notebooks/NAME.ipynb is generated from notebooks/NAME.py"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_source(name):
  with open(_path(name), encoding="utf-8") as handle:
    assert handle.read() == render(name), (
        f"notebooks/{name}.ipynb is stale: run .venv/bin/python tests/test_notebooks.py")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_layout(name):
  notebook = _read(name)
  first = notebook.cells[0]
  assert first.cell_type == "markdown" and COLAB.format(name) in first.source
  code = _code_cells(notebook)
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


if __name__ == "__main__":
  for name in NAMES:
    with open(_path(name), "w", encoding="utf-8") as handle:
      handle.write(render(name))
    print("wrote", _path(name))
