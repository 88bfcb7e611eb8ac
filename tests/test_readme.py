"""The README's own-LightningModule example runs as printed and shows a leak on memorised random labels."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_own_module_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without a logger the run's mia/ folder goes to the working directory
    text = README.read_text()
    code = re.search(r"<!-- own-module-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 32
    out = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)
    rows = {r["slice"]: r for r in scope["monitor"].last_result.rows if r["feature"] == "loss"
            and r["attack"] == "threshold"}
    assert rows["all"]["train_acc"] > 0.9 and rows["all"]["test_acc"] < 0.5  # memorised random labels
    assert rows["all"]["balanced_accuracy"] > 0.65
    assert "'all'" in out.getvalue()
