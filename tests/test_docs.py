"""The README and docs stay true: the config reference is the dataclass's, the Makefile targets exist."""

from pathlib import Path

from dphrl.config import config_help

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    doc = (ROOT / "docs" / "config.md").read_text()
    assert config_help() in doc, "docs/config.md is stale: regenerate it with `dphrl config` (see its header)"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
