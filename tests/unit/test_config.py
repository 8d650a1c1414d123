"""Settings: read from the environment by ``from_env`` only, typed, frozen; a bad value or an
unknown ``CHUNKFOLD_`` variable is one ``SettingsError`` line (the commands exit 2 on it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from chunkfold.config import OTHER_VARIABLES, Settings, SettingsError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*(Settings.env_name(name) for name in Settings.model_fields), *OTHER_VARIABLES]:
        monkeypatch.delenv(name, raising=False)


def test_construction_takes_its_arguments_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHUNKFOLD_PARTITIONS", "3")
    assert Settings().partitions == 8
    assert Settings(partitions=1).partitions == 1
    assert Settings.from_env().partitions == 3


def test_from_env_reads_every_setting_and_overrides_given_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    monkeypatch.setenv("CHUNKFOLD_DRIVER", "faust")
    monkeypatch.setenv("CHUNKFOLD_IDLE_TIMEOUT_S", "1e3")
    monkeypatch.setenv("CHUNKFOLD_SNAPSHOTS", " true ")
    monkeypatch.setenv("CHUNKFOLD_PARTIAL_PARSE", "0")
    settings = Settings.from_env(driver=None, app_id="other")
    assert settings.bootstrap_servers == "broker:9092" == Settings().bootstrap_servers
    assert (settings.driver, settings.app_id, settings.idle_timeout_s) == ("faust", "other", 1000.0)
    assert (settings.snapshots, settings.partial_parse) == (True, False)
    assert Settings.from_env(bootstrap_servers="flag:9092").bootstrap_servers == "flag:9092"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CHUNKFOLD_PARTITIONS", "8.5", "CHUNKFOLD_PARTITIONS='8.5': Input should be a valid integer"),
        (
            "CHUNKFOLD_COMMIT_INTERVAL_S",
            "soon",
            "CHUNKFOLD_COMMIT_INTERVAL_S='soon': Input should be a valid number",
        ),
        (
            "CHUNKFOLD_PROCESSING_GUARANTEE",
            "twice",
            "CHUNKFOLD_PROCESSING_GUARANTEE='twice': Input should be 'at_least_once' or 'exactly_once'",
        ),
        (
            "CHUNKFOLD_MAX_MESSAGE_BYTES",
            "8192",
            "CHUNKFOLD_MAX_MESSAGE_BYTES='8192': Input should be greater than or equal to 16384",
        ),
        (
            "CHUNKFOLD_PARTIAL_PARSE",
            "perhaps",
            "CHUNKFOLD_PARTIAL_PARSE='perhaps': Input should be a valid boolean",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        Settings.from_env()
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_bad_override_is_named_as_given() -> None:
    with pytest.raises(SettingsError, match=r"^driver='fast': Input should be 'direct' or 'faust'$"):
        Settings.from_env(driver="fast")


def test_unknown_chunkfold_variables_are_refused_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHUNKFOLD_PARTITION", "4")
    monkeypatch.setenv(
        "CHUNKFOLD_BOOTSTRAP_SERVERS", "broker:9092"
    )  # the brokers are KAFKA_BOOTSTRAP_SERVERS
    monkeypatch.setenv("CHUNKFOLD_KAFKA_PORT", "19092")  # the development broker's, no setting but known
    with pytest.raises(
        SettingsError, match=r"^CHUNKFOLD_BOOTSTRAP_SERVERS, CHUNKFOLD_PARTITION: no such setting"
    ):
        Settings.from_env()


def test_settings_are_frozen_and_copied_with_changes() -> None:
    settings = Settings(partitions=2)
    with pytest.raises(ValidationError):
        settings.partitions = 3  # type: ignore[misc]
    changed = settings.model_copy(update={"driver": "faust"})
    assert (changed.driver, changed.partitions, settings.driver) == ("faust", 2, "direct")
    assert hash(settings) == hash(Settings(partitions=2))


def test_every_chunkfold_variable_the_project_names_is_known() -> None:
    """Deployments, docs and tools (outside ``chunkfold.config`` itself) name settings that
    exist, and the variables that are no settings (``OTHER_VARIABLES``) are still read somewhere."""
    known = {Settings.env_name(name) for name in Settings.model_fields}
    named: dict[str, set[str]] = {}
    for path in [
        ROOT / "README.md",
        ROOT / "Makefile",
        *(ROOT / "deploy").rglob("*"),
        *(ROOT / "worker").rglob("*.py"),
    ]:
        if path.is_file() and path.suffix != ".pyc" and path != ROOT / "worker/chunkfold/config.py":
            for name in re.findall(r"CHUNKFOLD_[A-Z][A-Z0-9_]*", path.read_text(errors="replace")):
                named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: where for name, where in named.items() if name not in known | OTHER_VARIABLES}
    assert not unknown, f"no such setting: {unknown}"
    assert not OTHER_VARIABLES - set(named), "listed in OTHER_VARIABLES but read nowhere"
