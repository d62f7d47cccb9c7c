"""Without Ray installed, asking for a Ray cluster says what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_DRIVER = textwrap.dedent(
    """
    import sys
    sys.modules["ray"] = None  # as if Ray were not installed
    import streamwise

    @streamwise.deployment
    class Echo:
        async def __call__(self, x):
            return x

    try:
        streamwise.run(Echo.bind(), cluster="ray")
    except streamwise.exceptions.UsageError as exc:
        print(exc)
    else:
        print("ran without Ray")
    """
)


def test_cluster_ray_without_ray_names_the_extra():
    out = subprocess.run([sys.executable, "-c", _DRIVER], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'streamwise[ray]'" in out.stdout, out.stdout
