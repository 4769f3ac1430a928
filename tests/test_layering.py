"""Import direction: encoders <- mmgpt <- train; inference needs neither accelerate nor datasets."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_top_modules(package: str, module_level_only: bool) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        names = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_encoders_import_neither_mmgpt_nor_train():
    for path, names in imported_top_modules("encoders", module_level_only=False).items():
        assert not names & {"mmgpt", "train"}, (path, names & {"mmgpt", "train"})


def test_mmgpt_imports_no_training_stack_at_module_level():
    for path, names in imported_top_modules("mmgpt", module_level_only=True).items():
        bad = names & {"train", "accelerate", "datasets"}
        assert not bad, (path, bad)


def test_importing_mmgpt_loads_no_training_stack():
    # transformers itself imports accelerate when present, so only our own training stack is checked here;
    # the module-level test above covers mmgpt's own imports of accelerate.
    code = (
        "import sys, mmgpt, mmgpt.cli; from mmgpt import MMGPTModel, MMGPTProcessor, load; "
        "bad = [m for m in ('datasets', 'train') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
