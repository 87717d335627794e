"""The README's quickstart runs as written and its loss falls."""
import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def quickstart_code() -> str:
  text = open(README, encoding="utf-8").read()
  section = text.split("## Quickstart", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_loss_falls(tmp_path):
  script = tmp_path / "quickstart.py"
  script.write_text(quickstart_code())
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  losses = [float(line.split()[1]) for line in result.stdout.splitlines()
            if re.fullmatch(r"\d+ [-+0-9.eE]+", line.strip())]
  assert len(losses) == 5 and losses[-1] < losses[0], result.stdout
  exported = tmp_path / "runs" / "quickstart_adapter"
  assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(exported))
