"""The recipes of recipes/ load by name (the package optimum_dfq.recipes), and a path keeps working as before."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest

import optimum_dfq
from optimum_dfq import ConfigError, DFQConfig, list_recipes
from optimum_dfq.bundled_recipes import read_recipe

ROOT = Path(__file__).resolve().parents[1]
REPO_RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_every_recipe_of_the_folder_is_bundled():
    """The installed package optimum_dfq.recipes is the repository's recipes/ folder, every file of it."""
    assert REPO_RECIPES
    assert list_recipes() == [path.stem for path in REPO_RECIPES]
    assert optimum_dfq.list_recipes is list_recipes


@pytest.mark.parametrize("path", REPO_RECIPES, ids=lambda p: p.stem)
def test_name_reads_the_same_recipe_as_its_path(path):
    assert read_recipe(path.stem) == (f"bundled recipe {path.stem!r}", path.read_text(encoding="utf-8"))
    assert DFQConfig.from_yaml(path.stem) == DFQConfig.from_yaml(path) == DFQConfig.from_yaml(str(path))


def test_a_name_is_read_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = DFQConfig.from_yaml("sardfq_w4a4")
    assert (config.synthesizer, config.post_softmax) == ("sardfq", "log2")


def test_an_existing_file_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("sardfq_w4a4").write_text("bits: w8a8\n", encoding="utf-8")
    assert read_recipe("sardfq_w4a4")[0] == "recipe file 'sardfq_w4a4'"
    config = DFQConfig.from_yaml("sardfq_w4a4")
    assert (config.bits, config.synthesizer) == ("w8a8", DFQConfig().synthesizer)
    Path("default").mkdir()  # a folder is no recipe: the bundled one is read
    assert read_recipe("default")[0] == "bundled recipe 'default'"


def test_unknown_name_lists_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"Unknown recipe 'sardfq' \(did you mean 'sardfq_w4a4'\?\)") as info:
        DFQConfig.from_yaml("sardfq")
    message = str(info.value)
    assert f"Bundled recipes, by name: {', '.join(list_recipes())};" in message
    assert "a path to a YAML recipe file is also accepted" in message


def test_missing_path_is_not_a_name(tmp_path, monkeypatch):
    """A path (folder part, .yaml suffix, or a Path object) is never looked up by name; the error points at the name."""
    monkeypatch.chdir(tmp_path)
    for recipe in ("recipes/sardfq_w4a4.yaml", "sardfq_w4a4.yaml", Path("sardfq_w4a4")):
        with pytest.raises(ConfigError, match=f"Recipe file '{recipe}' does not exist") as info:
            DFQConfig.from_yaml(recipe)
        assert "load it by name, 'sardfq_w4a4'" in str(info.value)
    Path("recipes").mkdir()
    with pytest.raises(ConfigError, match="'recipes' is a folder; pass a recipe file or a bundled recipe's name"):
        DFQConfig.from_yaml("recipes")


def test_without_the_installed_package_a_name_says_how_to_fix_it(tmp_path, monkeypatch):
    """optimum_dfq imported from a source tree that is not pip-installed: names fail saying so, paths still work."""
    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(ConfigError, match=r"'sardfq_w4a4' is not a file, and cannot be looked up by name.*"
                                          r"pip install -e \."):
        DFQConfig.from_yaml("sardfq_w4a4")
    assert DFQConfig.from_yaml(ROOT / "recipes" / "sardfq_w4a4.yaml").synthesizer == "sardfq"
