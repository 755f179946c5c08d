"""Runs every docstring example of the package (diffusers-style, inside ```py fences) as a doctest."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import diffusers_vrfm


def _examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    for module_info in pkgutil.walk_packages(diffusers_vrfm.__path__, "diffusers_vrfm."):
        module = importlib.import_module(module_info.name)
        for test in finder.find(module):
            if test.examples and inspect.getmodule(module) is module:
                yield pytest.param(test, id=test.name)


def _strip_fences(test: doctest.DocTest) -> doctest.DocTest:
    # The closing fence of a ```py block follows the expected output directly; it is markup, not output.
    for example in test.examples:
        example.want = "".join(line for line in example.want.splitlines(True) if not line.strip().startswith("```"))
    return test


@pytest.mark.parametrize("test", list(_examples()))
def test_docstring_example(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(_strip_fences(test))
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {test.name}"
