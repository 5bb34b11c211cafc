"""The README is the operator's reference: it must name every setting and the two set-up commands."""

from pathlib import Path

from core.config import Settings, env_var_name

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_documents_every_setting():
    missing = [env_var_name(name) for name in Settings.model_fields if f"`{env_var_name(name)}`" not in README]
    assert not missing, f"README lacks {missing}: regenerate its table with core.config.settings_table_markdown()"


def test_readme_gives_the_two_setup_commands_and_ci_runs_the_test_one():
    assert "bash scripts/serve.sh" in README and "bash scripts/test.sh" in README
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
