"""The `elbox` command line: each command's parser (train's generated from the config dataclasses); the commands call
the public API."""

from elbox.core.threads import apply_wait_policy

apply_wait_policy()  # the elbox command's OpenMP wait policy, before anything imports torch (elbox.core.threads)

from elbox.cli.main import main  # noqa: E402

__all__ = ["main"]
