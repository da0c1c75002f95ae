"""The operator docs name only things that exist: every repository path in README.md and the
deploy files, and every Prometheus Operator / KEDA kind they mention."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deploytools import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML comes with yamllint: pip install -e '.[deploy]'")

# What an operator reads: the README, the Containerfile, the example configs, every deploy file.
DOCUMENTS = sorted(
    [REPO / "README.md", REPO / "Containerfile", *(REPO / "config").iterdir()]
    + [p for p in (REPO / "deploy").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
)
# A repository path: a top-level directory of this repo, then a file or directory in it. Not when
# it is part of a longer path (/srv/minicelery/x.py, ghcr.io/minicelery/minicelery, a URL).
TOP = "|".join(re.escape(p.name) for p in REPO.iterdir() if p.is_dir() and p.name not in {".git", ".venv"})
REPO_PATH = re.compile(rf"(?<![\w/.@%{{$-])(?:{TOP})/[\w./@*{{}}-]*[\w*@/]")
# In a deploy directory, a bare manifest name ("see servicemonitor.yaml") means a sibling file.
SIBLING = re.compile(r"(?<![\w/.-])[\w-]+\.ya?ml\b")
KINDS = ("PodMonitor", "ServiceMonitor", "ScaledObject", "TriggerAuthentication", "PodDisruptionBudget")


def named_paths(document: Path) -> list[tuple[str, Path]]:
    text = document.read_text()
    found = [(name, REPO / name.rstrip("/")) for name in REPO_PATH.findall(text)]
    if document.parent.parent == REPO / "deploy" and document.suffix in (".yaml", ".yml"):
        found += [(name, document.parent / name) for name in SIBLING.findall(text)]
    return found


def exists(path: Path) -> bool:
    """The path exists; a glob (minicelery/scripts/*.lua, deploy/*/README.md) matches something."""
    return bool(list(REPO.glob(str(path.relative_to(REPO))))) if "*" in str(path) else path.exists()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_a_document_names_exists(document: Path) -> None:
    missing = sorted({name for name, path in named_paths(document) if not exists(path)})
    assert not missing, f"{document.relative_to(REPO)} names files that do not exist: {missing}"


def test_the_path_check_finds_paths() -> None:
    """The regexes above mean something: they see the paths the README does name."""
    names = {name for name, _ in named_paths(REPO / "README.md")}
    assert {"deploy/systemd/minicelery@.service", "config/tasks.toml", "deploy/prometheus/alerts.yml"} <= names
    assert not any(name.startswith("minicelery/minicelery") for name in names)


def test_every_kind_the_docs_mention_is_a_manifest() -> None:
    shipped = {
        doc["kind"]
        for manifest in (REPO / "deploy" / "kubernetes").glob("*.yaml")
        for doc in yaml.safe_load_all(manifest.read_text())
        if doc
    }
    for document in DOCUMENTS:
        for kind in KINDS:
            if re.search(rf"\b{kind}\b", document.read_text()):
                assert kind in shipped, f"{document.relative_to(REPO)} mentions a {kind}; deploy/kubernetes has none"
