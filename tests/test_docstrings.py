"""The examples in the package's docstrings run and print what they claim (those not marked `+SKIP`)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re

import pytest

import optimum_dfq

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(optimum_dfq.__path__, prefix="optimum_dfq.")
    if not info.name.startswith("optimum_dfq.metrics")
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


class FencedDocTestParser(doctest.DocTestParser):
    """Examples sit in Markdown code fences (HF docstring style); a closing fence is not expected output."""

    def parse(self, string: str, name: str = "<string>"):
        return super().parse(re.sub(r"^[ \t]*```\w*[ \t]*$", "", string, flags=re.MULTILINE), name)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(parser=FencedDocTestParser())
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(module, module.__name__):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring example(s) of {name} failed"
