"""README and code tell one story: the settings table is the settings model."""
from pathlib import Path

from services.settings import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_settings_table_is_the_settings_model():
    text = README.read_text()
    start = text.index("| variable | default | meaning |")
    end = text.index("\n\n", start)
    assert text[start:end] == settings_table(), "regenerate with: python -c 'from services.settings import settings_table; print(settings_table())'"


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
