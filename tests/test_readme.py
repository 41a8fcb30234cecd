"""The README's examples, as written: every ```yaml block loads through the deploy-config schema
(`pipeline.config.load_config`, what `hero run` reads), every deploy_configs/*.yaml it names exists
and loads, and the own-model example (`flowers.yaml`, no gate section) runs end to end at a tiny
size, exits 0 and says that nothing was gated.

The blocks are read in a folder laid out as the README's examples assume: `data/flowers` an image
folder and `my_pkg/nets.py` defining `build`. One kind of ```yaml block is not a deploy config and is
skipped by rule: a GitHub Actions job (every top-level value a mapping with `runs-on` and `steps`).
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLASSES = ["daisy", "rose"]  # the README's save_for_deploy example names these

NETS = '''
from torch import nn


class MyNet(nn.Sequential):
    def __init__(self, num_classes, in_channels, width):
        super().__init__(nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def build(num_classes=10, in_channels=3, width=32):
    return MyNet(num_classes, in_channels, width)
'''


def fenced_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, body) of every ```language block of a Markdown text."""
    blocks, start, body = [], None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if start is None and line.strip() == f"```{language}":
            start, body = number, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line)
    assert start is None, f"README.md line {start}: ```{language} block never closed"
    return blocks


def is_ci_job(document) -> bool:
    """The skip rule: a GitHub Actions job, not a deploy config."""
    return isinstance(document, dict) and bool(document) and all(
        isinstance(job, dict) and "runs-on" in job and "steps" in job for job in document.values())


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """A working folder as the README's own-model example assumes one: an image folder
    data/flowers (train/ and test/, two classes, 16x16 PNGs) and the factory my_pkg.nets:build."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        for label, name in enumerate(CLASSES):
            folder = tmp_path / "data" / "flowers" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                image[..., label] = 220  # learnable: each class bright in its own channel
                Image.fromarray(image).save(folder / f"{i}.png")
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "my_pkg" or m.startswith("my_pkg.")]:
        del sys.modules[name]


def test_every_yaml_block_of_the_readme_is_a_valid_deploy_config_or_a_ci_job(readme_folder):
    blocks = fenced_blocks(README.read_text(), "yaml")
    failures, loaded, skipped = [], [], []
    for line, body in blocks:
        if is_ci_job(yaml.safe_load(body)):
            skipped.append(line)
            continue
        path = readme_folder / f"readme-line-{line}.yaml"
        path.write_text(body)
        try:
            loaded.append(load_config(path).name)
        except Exception as exc:  # noqa: BLE001  every problem of every block, each with its line
            failures.append(f"README.md line {line}: {exc}")
    assert not failures, "\n".join(failures)
    assert "flowers" in loaded and len(skipped) == 1, (loaded, skipped)


def test_every_deploy_config_the_readme_names_exists_and_loads():
    named = sorted(set(re.findall(r"deploy_configs/[\w.-]+\.yaml", README.read_text())))
    assert "deploy_configs/quickstart.yaml" in named and "deploy_configs/x86-onnxruntime.yaml" in named, named
    missing = [path for path in named if not (ROOT / path).is_file()]
    assert not missing, f"README.md names configs that do not exist: {missing}"
    for path in named:
        assert load_config(ROOT / path).name == Path(path).stem


def flowers_block() -> dict:
    [config] = [yaml.safe_load(body) for _, body in fenced_blocks(README.read_text(), "yaml")
                if "name: flowers" in body]
    return config


def test_the_own_model_example_runs_end_to_end_and_says_nothing_was_gated(readme_folder, capsys):
    config = flowers_block()
    assert "gate" not in config  # the point of this test: a first run names no threshold
    config["data"].update(image_size=16, limit_test=8)
    config["train"].update(epochs=1)
    (readme_folder / "flowers.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "flowers.yaml"]) == 0
    printed = capsys.readouterr().out
    assert "gate: NOT GATED" in printed and "nothing was gated" in printed and "FAIL" not in printed
    run = readme_folder / "runs" / "flowers"
    gate = json.loads((run / "report.json").read_text())["gate"]
    assert gate["passed"] and not gate["gated"] and gate["reasons"] == [] and "nothing was gated" in gate["note"]
    assert "Gate: **NOT GATED**" in (run / "report.md").read_text()
    assert (run / "bundle" / "manifest.json").is_file()
    # the CI gate still refuses a check with no threshold: exit 2, one line
    assert main(["check", str(run / "report.json")]) == 2
    assert capsys.readouterr().err.strip().startswith("hero: error: the gate checks no accuracy")
