"""The Python names README.md tells users to import exist where it says they are."""

import importlib
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def dotted_names() -> list[str]:
    """Every `optimum_dfq.a.b` written in backticks, and every `from optimum_dfq... import x, y` of a code block."""
    spans = re.findall(r"`([^`\n]+)`", README)
    names = {name for span in spans for name in re.findall(r"\boptimum_dfq(?:\.[A-Za-z_]\w*)+", span)}
    for module, imported in re.findall(r"^from (optimum_dfq[\w.]*) import ([\w, ]+)", README, flags=re.MULTILINE):
        names |= {f"{module}.{name.strip()}" for name in imported.split(",")}
    return sorted(names)


def resolve(dotted: str) -> object:
    """Imports the longest module prefix of `dotted` and reads the rest as attributes."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[end:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


def test_readme_names_some_python_api():
    names = dotted_names()
    # the ones a user needs a module path for, since the package's top level does not export them
    assert {"optimum_dfq.calibration.register_scale_selector", "optimum_dfq.quantizers.build_quantizer",
            "optimum_dfq.evaluation.evaluate_accuracy", "optimum_dfq.export.to_onnx",
            "optimum_dfq.DataFreeViTQuantizer"} <= set(names)


@pytest.mark.parametrize("dotted", dotted_names())
def test_readme_python_name_exists(dotted):
    resolve(dotted)  # raises ModuleNotFoundError / AttributeError when README names something that is not there
