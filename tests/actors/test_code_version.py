"""The code version that decides whether a dead driver's replica is taken back.

Each case is computed by a driver script in a process of its own (as a driver
would), twice, then once more after its source changed. Taking back and replacing
on a Ray cluster are in ``tests/cluster``.
"""

from __future__ import annotations

import json
import subprocess
import sys

_SCRIPT = '''
import json
import numpy as np
import streamwise
from streamwise.actors._code_version import code_version
from streamwise.actors.spec import plan_app


@streamwise.deployment(num_replicas=2, user_config={"threshold": 1})
class Leaf:
    def __init__(self, weights, options):
        self.weights = weights

    async def __call__(self):
        return 1


@streamwise.deployment
class Root:
    def __init__(self, leaf, transform):
        self.leaf = leaf

    async def __call__(self):
        return 1


def transform(x):
    return x


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def apply(self, x):
        return x * self.factor


def versions(root):
    return {spec.config.name: code_version(spec) for spec in plan_app(root, "app").specs}


live = Leaf.options(
    num_replicas=None, user_config={"threshold": 2}, autoscaling_config={"min_replicas": 1, "max_replicas": 4}
)
cases = {
    "base": versions(Root.bind(Leaf.bind(np.arange(8), {"mode": "fast"}), transform)),
    "again": versions(Root.bind(Leaf.bind(np.arange(8), {"mode": "fast"}), transform)),
    "live": versions(Root.bind(live.bind(np.arange(8), {"mode": "fast"}), transform)),
    "weights": versions(Root.bind(Leaf.bind(np.arange(9), {"mode": "fast"}), transform)),
    "option": versions(Root.bind(Leaf.bind(np.arange(8), {"mode": "slow"}), transform)),
    "unconfigured": versions(Root.bind(Leaf.options(user_config=None).bind(np.arange(8), {"mode": "fast"}), transform)),
    "rebuilt": versions(Root.bind(Leaf.options(max_ongoing_requests=7).bind(np.arange(8), {"mode": "fast"}), transform)),
    "lambda": versions(Root.bind(Leaf.bind(np.arange(8), {"mode": "fast"}), lambda x: x)),
    "twice": versions(Root.bind(Leaf.bind(np.arange(8), {"mode": "fast"}), Scaler(2).apply)),
    "thrice": versions(Root.bind(Leaf.bind(np.arange(8), {"mode": "fast"}), Scaler(3).apply)),
}
print(json.dumps(cases))
'''


def _run(script) -> dict[str, dict[str, str]]:
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_driver_script_has_one_version_per_spec_in_every_process_until_its_source_changes(tmp_path):
    """The same script gives the same versions in two processes. What a running
    replica takes as it is (replica count, autoscaling, a new user_config) leaves a
    version; whether there is a user_config, the bound arguments (a bound method's
    object too) and the config a replica is built with change it. A lambda among the
    arguments gives none (it is never taken back), and a changed source changes all."""
    script = tmp_path / "driver.py"
    script.write_text(_SCRIPT)
    first, second = _run(script), _run(script)
    assert first == second
    base = first["base"]
    assert all(base.values()) and base["Leaf"] != base["Root"]
    assert first["again"] == base and first["live"] == base
    assert first["weights"]["Leaf"] != base["Leaf"] and first["weights"]["Root"] == base["Root"]
    for case in ("option", "unconfigured", "rebuilt"):
        assert first[case]["Leaf"] != base["Leaf"], case
    assert first["lambda"] == {"Leaf": base["Leaf"], "Root": ""}
    assert first["twice"]["Root"] and first["twice"]["Root"] not in (first["thrice"]["Root"], base["Root"])
    script.write_text(_SCRIPT + "# a comment\n")
    changed = _run(script)["base"]
    assert changed["Leaf"] not in ("", base["Leaf"]) and changed["Root"] not in ("", base["Root"])
