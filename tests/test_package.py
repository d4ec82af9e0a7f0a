"""The package's layout promises: where distribution may be imported, and modules of one concern."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mgmoe_ds"
# The only modules that may import torch.distributed or DeepSpeed, at the top or inside a function.
DISTRIBUTED_MODULES = {"train/distributed.py", "train/trainer.py", "train/checkpoints.py", "moe/parallel.py",
                       "moe/deepspeed_compat.py"}
MAX_LINES = 420  # "no module over ~400 lines": past that a module holds two concerns


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_distribution_is_imported_only_by_its_own_modules(path):
    relative = str(path.relative_to(PACKAGE))
    distributed = {n for n in imported_modules(path) if n.split(".")[0] == "deepspeed" or n.startswith("torch.distributed")}
    if relative not in DISTRIBUTED_MODULES:
        assert not distributed, f"{relative} imports {sorted(distributed)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_grows_past_one_concern(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines"
