"""Fixtures shared by the reproduction wing's tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

_HOLDER = """
import sys, time
from batchnorm.reproduce import run_folder
run_folder.hold(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held_by_another_process():
    """Start a child process that holds a run folder, as a run going on there would.

    Call it with the folder; it returns the child (``.pid``), which is killed at teardown
    if the test has not killed it.
    """
    children = []

    def start(run_dir):
        child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        children.append(child)
        assert child.stdout.readline().strip() == "held"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()
        child.stdout.close()
