"""Session fixtures shared by the export, eval and bench tests (registered by conftest.py's `pytest_plugins`)."""
