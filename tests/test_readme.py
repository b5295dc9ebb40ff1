"""The README's framework snippets are the ones the integration tests run: each equals the marked
block of its docs page (tests/test_lightning.py, test_huggingface.py and test_accelerate.py execute
those blocks), so a snippet in the README cannot drift from tested code."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = {"lightning": "lightning.md", "huggingface": "huggingface.md", "accelerate": "accelerate.md"}


def _block(text: str, name: str) -> str:
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"no '<!-- snippet: {name} -->' python block"
    return m.group(1)


@pytest.mark.parametrize("name", list(SNIPPETS))
def test_readme_snippet_is_the_tested_one(name):
    readme = (ROOT / "README.md").read_text()
    doc = (ROOT / "docs" / SNIPPETS[name]).read_text()
    assert _block(readme, name) == _block(doc, name), f"README's {name} snippet differs from docs/{SNIPPETS[name]}"
