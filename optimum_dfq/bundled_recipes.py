"""The YAML recipes shipped with the package, found by name: `DFQConfig.from_yaml("sardfq_w4a4")`,
`optimum-dfq quantize ... --recipe sardfq_w4a4`.

They are the repository's top-level `recipes/` folder, which pyproject.toml installs as the package
`optimum_dfq.recipes` (in a wheel and in an editable install alike), and are read with `importlib.resources`.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from .errors import ConfigError
from .registry import closest_hint

#: The package that holds the bundled recipes (the repository's `recipes/` folder).
RECIPES_PACKAGE = "optimum_dfq.recipes"
#: A bundled recipe is the file `NAME.yaml` of that package.
RECIPE_SUFFIX = ".yaml"


def _bundled_folder():
    try:
        return importlib.resources.files(RECIPES_PACKAGE)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"The bundled recipes are not available: {RECIPES_PACKAGE} is not importable, as when optimum_dfq is "
            "imported from a source tree that is not pip-installed. Install it (pip install -e .), or pass the "
            "recipe's path (e.g. recipes/default.yaml)."
        ) from err


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package, each usable wherever a recipe path is
    ([`DFQConfig.from_yaml`], `optimum-dfq quantize --recipe`).

    Returns:
        `list[str]`: sorted names (file names without `.yaml`).

    Raises:
        `ConfigError`: the recipes are not installed (optimum_dfq imported from a source tree that is not
            pip-installed).

    Example:
        >>> from optimum_dfq import list_recipes
        >>> "sardfq_w4a4" in list_recipes()
        True
    """
    return sorted(entry.name[: -len(RECIPE_SUFFIX)] for entry in _bundled_folder().iterdir()
                  if entry.name.endswith(RECIPE_SUFFIX) and entry.is_file())


def read_recipe(recipe: str | os.PathLike) -> tuple[str, str]:
    """Reads a recipe given by path or by the name of a bundled one.

    An existing file is read as a path, even when its name is also a bundled recipe's. A `str` that is not a file
    is looked up among the bundled recipes when it is a bare name (no folder part, no `.yaml` / `.yml` suffix),
    before a folder of that name is refused. A `Path` is always a path.

    Args:
        recipe (`str` or `os.PathLike`): a YAML file, or a bundled recipe's name (see [`list_recipes`]).

    Returns:
        `tuple[str, str]`: what was read, for messages (`"recipe file 'x.yaml'"` or `"bundled recipe 'name'"`),
        and the YAML text.

    Raises:
        `ConfigError`: no such file and no bundled recipe of that name (the message lists the bundled names), or
            a folder.

    Example:
        >>> source, text = read_recipe("default")
        >>> source
        "bundled recipe 'default'"
    """
    path = Path(recipe)
    if isinstance(recipe, str) and not path.is_file() and _is_bare_name(recipe):
        try:
            names = list_recipes()
        except ConfigError as err:
            if not path.is_dir():  # a folder is refused below as such
                raise ConfigError(f"Recipe {recipe!r} is not a file, and cannot be looked up by name. {err}") from err
            names = []
        if recipe in names:
            text = (_bundled_folder() / f"{recipe}{RECIPE_SUFFIX}").read_text(encoding="utf-8")
            return f"bundled recipe {recipe!r}", text
        if not path.is_dir():
            raise ConfigError(f"Unknown recipe {recipe!r}{closest_hint(recipe, names)}: no such file, and no bundled "
                              "recipe has that name. "
                              f"{_choices(path)}")
    try:
        return f"recipe file {str(path)!r}", path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"Recipe file {str(path)!r} does not exist. {_choices(path)}") from err
    except IsADirectoryError as err:
        raise ConfigError(f"{str(path)!r} is a folder; pass a recipe file or a bundled recipe's name. "
                          f"{_choices(path)}") from err


def _is_bare_name(text: str) -> bool:
    separators = {"/", os.sep, os.altsep} - {None}
    return bool(text) and not any(sep in text for sep in separators) and Path(text).suffix not in (".yaml", ".yml")


def _choices(path: Path) -> str:
    """The bundled names (and the one `path` seems to mean), or why there are none, for an error message."""
    try:
        names = list_recipes()
    except ConfigError as err:
        return str(err)
    meant = f" ({path.name!r} is bundled: load it by name, {path.stem!r})" if path.stem in names else ""
    return f"Bundled recipes, by name: {', '.join(names)}{meant}; a path to a YAML recipe file is also accepted."
