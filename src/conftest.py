"""Doctests of the package's docstrings: their temporary files go where pytest cleans up."""

import tempfile

import pytest


@pytest.fixture(autouse=True)
def _temporary_files_in_pytest_tmp(tmp_path, monkeypatch):
    # The examples call tempfile.mkdtemp() as a reader would; here it lands under tmp_path
    # instead of leaving a folder in /tmp on every run of the tests.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
