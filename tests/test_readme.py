"""The README's generated tables match the committed results files (no number is typed by hand)."""

from __future__ import annotations

from nerd import readme


def test_readme_tables_are_generated_from_the_results_files():
    text = (readme.ROOT / "README.md").read_text()
    assert readme.render(text) == text, "README.md is out of date: run `python -m nerd.readme`"


def test_every_block_is_present():
    text = (readme.ROOT / "README.md").read_text()
    for name in readme.BLOCKS:
        assert f"<!-- BEGIN {name} -->" in text and f"<!-- END {name} -->" in text, name
