"""Documents the code points to exist in the repository: every document under docs/ named in the
package, the tests, the benchmarks, the configs or the README is a file of ``docs/``, and nothing
points to a design document outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["stableflows", "tests", "benchmarks", "configs", "docs", "README.md", "Makefile", "pyproject.toml"]


def _texts():
    for s in SOURCES:
        p = ROOT / s
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file() and f.suffix in (".py", ".md", ".toml", ".yaml", ".yml", "") and "__pycache__" not in f.parts:
                yield f, f.read_text(errors="replace")


def test_every_docs_reference_exists():
    refs = {}
    for f, text in _texts():
        for m in re.finditer(r"docs/([A-Za-z0-9_\-]+\.md)", text):
            refs.setdefault(m.group(1), f)
    assert "METRICS.md" in refs
    missing = {name: str(f.relative_to(ROOT)) for name, f in refs.items() if not (ROOT / "docs" / name).is_file()}
    assert not missing, f"references to documents that are not in docs/: {missing}"


def test_no_reference_to_a_document_outside_the_repository():
    design = "DESIGN" + ".md"  # spelled apart so this file does not match itself
    hits = [str(f.relative_to(ROOT)) for f, text in _texts() if design in text]
    assert not hits, f"{design} is not part of the repository; point to docs/METRICS.md instead: {hits}"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_build_snippet_runs():
    """The README's "Build" code block, executed as a user pastes it."""
    block = re.search(r"```python\n(.*?)```", _section("Build"), re.S).group(1)
    exec(compile(block, "README.md (Build)", "exec"), {})


def test_readme_load_flow_snippet_runs_on_a_trained_run(tmp_path):
    """The README's ``load_flow`` block, on a run trained here (its path in place of runs/demo)."""
    from stableflows.config import RunConfig
    from stableflows.train import train

    cfg = RunConfig().replace("model", hidden=4, levels=1, steps_per_level=1).replace(
        "train", steps=2, eval_every=2, out_dir=str(tmp_path / "demo"), progress=False)
    train(cfg)
    blocks = re.findall(r"```python\n(.*?)```", _section("Build"), re.S)
    (block,) = [b for b in blocks if "load_flow(" in b]
    assert '"runs/demo"' in block
    env: dict = {}
    exec(compile(block.replace('"runs/demo"', repr(str(tmp_path / "demo"))), "README.md (load_flow)", "exec"), env)
    assert env["ckpt"]["kind"] == "best" and env["ckpt"]["config"]["model"]["hidden"] == 4
    assert not env["flow"].training


def test_package_ships_py_typed():
    import tomllib

    assert (ROOT / "stableflows" / "py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["stableflows"]
