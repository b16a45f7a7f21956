"""What the README, docs/ and pyproject.toml promise, checked against the code."""

import re
from pathlib import Path

import pytest
import torch

from subspace_optim import GoLoreAdamW  # noqa: F401 (the README's line is evaluated below)
from subspace_optim.train.config import TrainConfig

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# When the torch APIs the package calls first shipped, read from the torch wheels' sources (2.3.1, 2.4.0, 2.12.0,
# 2.13.0): the CPU among the fused optimizer devices and torch.get_autocast_dtype in 2.4;
# torch.nn.functional.linear_cross_entropy and LinearCrossEntropyOptions (train --fused-loss) in 2.13.
TORCH_API_SINCE = {"fused AdamW on the CPU": (2, 4), "torch.get_autocast_dtype": (2, 4),
                   "torch.nn.functional.linear_cross_entropy": (2, 13)}


def test_pyproject_requires_a_torch_with_every_api_the_code_calls():
    (floor,) = re.findall(r'"torch>=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert tuple(map(int, floor)) >= max(TORCH_API_SINCE.values())
    assert hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch, "get_autocast_dtype")


def test_every_relative_link_in_the_docs_exists():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"
    assert "DESIGN.md" not in (ROOT / "README.md").read_text()  # the project's design page is docs/design.md


def test_the_readme_golore_at_20_line_has_the_papers_settings():
    """GoLore@20% as the README writes it: GoLore's settings (scale 0.25, gap 200, momentum projected, no weight
    decay), not SubspaceAdamW's generic defaults (scale 1.0, weight decay 1e-2)."""
    (call,) = re.findall(r"`(\w+\(groups, projector=\"hybrid\"[^`]*)`", (ROOT / "README.md").read_text())
    groups = [{"params": [torch.nn.Parameter(torch.zeros(8, 6))], "rank": 2}]
    group = eval(call, {**globals(), "groups": groups}).param_groups[0]
    assert {k: group[k] for k in ("projector", "random_fraction", "total_steps", "scale", "update_gap",
                                  "moments", "weight_decay")} == dict(
        projector="hybrid", random_fraction=0.2, total_steps=10_000, scale=0.25, update_gap=200, moments="project",
        weight_decay=0.0)


def test_the_resume_docs_list_every_setting_a_resumed_run_may_change():
    text = " ".join((ROOT / "docs" / "harness.md").read_text().split())
    sentence = text[text.index("`--resume RUN_DIR` continues"):]
    sentence = sentence[: sentence.index("may change")]
    listed = set(re.findall(r"`--([\w-]+)`", sentence))
    assert listed == {name.replace("_", "-") for name in TrainConfig.RESUMABLE} - {"resume"}
