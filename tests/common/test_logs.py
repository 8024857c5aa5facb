import io
import logging

import pytest

from oobleck.common.logs import setup_logging


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_level_from_environment(monkeypatch):
    monkeypatch.setenv("OOBLECK_LOG_LEVEL", "warning")
    stream = io.StringIO()
    setup_logging(stream=stream)
    logging.getLogger("oobleck.test").info("hidden")
    logging.getLogger("oobleck.test").warning("shown")
    assert "hidden" not in stream.getvalue()
    assert "WARNING oobleck.test: shown" in stream.getvalue()


def test_unknown_level_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown level 'LOUD'"):
        setup_logging("LOUD")
