"""The OpenMP wait setting that `import elbox` puts in the environment before torch loads (elbox.core.threads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from elbox.core.threads import WAIT_VARIABLES, apply_wait_policy


@pytest.fixture
def clean_environment(monkeypatch):
    for name in WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_a_short_spin_is_set_when_the_user_chose_nothing(clean_environment):
    assert not apply_wait_policy()  # torch is already imported in this test process: too late for it, but set
    assert os.environ["GOMP_SPINCOUNT"] == "1000" and "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize(
    "name, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000"), ("KMP_BLOCKTIME", "0")]
)
def test_the_users_own_choice_is_kept(clean_environment, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    apply_wait_policy()
    assert os.environ[name] == value
    assert [n for n in WAIT_VARIABLES if n in os.environ] == [name]


def test_the_elbox_command_sets_it_before_torch_loads_and_import_elbox_does_not():
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    code = "import os, sys, elbox; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None"]  # a library leaves the process's environment alone
    # the `elbox` command (console script and python -m elbox) imports elbox.cli first
    code = "import os, sys, elbox.cli; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1000", "False"]  # set while torch is not loaded yet: it takes effect
    code = "from elbox.core.threads import apply_wait_policy; print(apply_wait_policy()); import torch"  # the opt-in
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"]
