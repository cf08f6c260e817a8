"""Training and decoding know no model family: they import no family module, only the protocol."""
import ast
import pathlib

import jpeft

FAMILY_MODULES = {"jpeft.models.llama"}
PACKAGE = pathlib.Path(jpeft.__file__).parent


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_trainer_loss_and_generation_import_no_family():
    users = [*sorted((PACKAGE / "train").glob("*.py")), PACKAGE / "generate.py", PACKAGE / "evaluate.py"]
    assert len(users) > 5
    for path in users:
        assert not imported_modules(path) & FAMILY_MODULES, path


def test_the_checker_sees_a_family_import(tmp_path):
    """Guards the test above: an import of a family module is found, in both import forms."""
    for line in ("from jpeft.models.llama import CausalLM", "from jpeft.models import llama", "import jpeft.models.llama"):
        (tmp_path / "m.py").write_text(line + "\n")
        assert imported_modules(tmp_path / "m.py") & FAMILY_MODULES, line
