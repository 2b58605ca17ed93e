"""The test dataset of tests/test_prepare.py as a config file (for the entry points)."""

from tests import test_prepare


def get_config():
  return test_prepare.config()
