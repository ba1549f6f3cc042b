"""The house rules a test can check: imports point down (README "Layout"), no UI below cli/."""

from __future__ import annotations

import ast
from pathlib import Path

import sslcli

PACKAGE = Path(sslcli.__file__).parent

# Lower number = lower layer. A module may import its own layer or any lower one.
LAYERS = {
    "errors": 0, "typed": 0, "method_configs": 0, "config": 0, "runfiles": 0, "schedules": 0, "diagnostics": 0, "device": 0,
    "data": 1, "models": 1, "losses": 1,
    "methods": 2, "bootstrap": 2,
    "eval": 3, "train": 3,  # siblings: neither imports the other (test below)
    "export": 4, "neighbors": 4, "runs": 4, "plots": 4, "audit": 4, "feature_audit": 4, "contact_sheet": 4,
    "cli": 5, "__main__": 6,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "sslcli" or len(parts) == 1:
        return -1  # `import sslcli` (the version) is fine from anywhere
    return LAYERS[parts[1]]


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name.startswith("sslcli.presets"):
            continue
        yield name, path


def test_every_module_has_a_layer():
    for name, _ in modules():
        if name != "sslcli":
            layer_of(name)  # KeyError for a package missing from LAYERS


def test_imports_point_down():
    violations = []
    for name, path in modules():
        if name == "sslcli":
            continue
        mine = layer_of(name)
        for target in imports(path):
            if target.startswith("sslcli.") and layer_of(target) > mine:
                violations.append(f"{name} imports {target}")
    assert not violations, violations


def imports_from(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{name} imports {t}" for name, path in modules() if name.startswith(package)
            for t in imports(path) if t.startswith(forbidden)]


def test_eval_never_imports_methods_or_train():
    assert not imports_from("sslcli.eval", ("sslcli.methods", "sslcli.train"))


def test_train_never_imports_eval():
    """The online k-NN monitor is handed to the trainer (pretrain(make_monitor=...)), not imported."""
    assert not imports_from("sslcli.train", ("sslcli.eval",))


def test_bootstrapping_never_knows_the_method():
    assert not imports_from("sslcli.bootstrap", ("sslcli.methods", "sslcli.train"))


def test_on_disk_formats_have_one_owner():
    """Only sslcli.runfiles opens safetensors files for writing or names a format string."""
    for name, path in modules():
        if name != "sslcli.runfiles":
            text = path.read_text()
            for marker in ("save_file(", '"sslcli-train', '"sslcli-export'):
                assert marker not in text, f"{name} uses {marker}: go through sslcli.runfiles"


def test_no_typer_or_rich_below_cli():
    for name, path in modules():
        if not name.startswith("sslcli.cli"):
            bad = [t for t in imports(path) if t.split(".")[0] in ("typer", "rich", "click")]
            assert not bad, f"{name} imports {bad}"


def test_no_pickle_loading_outside_the_retrieval_unpickler():
    """Writing plain-data pickles (the retrieval ground-truth generator) is fine; loading is not."""
    for name, path in modules():
        if name != "sslcli.eval.retrieval":
            text = path.read_text()
            for call in ("pickle.load", "Unpickler", "torch.load(", "dill", "joblib"):
                assert call not in text, f"{name} uses {call}"


def test_every_subpackage_ships_in_the_wheel():
    """pyproject lists packages explicitly (presets/ is mapped in): a new folder must be listed."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    listed = set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])
    source = Path(__file__).resolve().parents[1] / "sslcli"
    folders = {"sslcli." + p.parent.relative_to(source).as_posix().replace("/", ".")
               for p in source.rglob("__init__.py") if p.parent != source}
    assert folders <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(folders - listed)}"
