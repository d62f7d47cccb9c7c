"""Config files: errors that name the file, line and key; `run FILE` and `deploy FILE`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from streamwise import _config_file
from streamwise.exceptions import UsageError

_APP = textwrap.dedent(
    """
    import streamwise

    @streamwise.deployment(user_config={"word": "code"})
    class Words:
        def reconfigure(self, config):
            self.word = config["word"]

        async def __call__(self):
            return self.word

    @streamwise.deployment
    class Front:
        def __init__(self, words):
            self.words = words

        async def __call__(self):
            return await self.words.remote()

    app = Front.bind(Words.bind())
    """
)


@pytest.mark.parametrize(
    "text,where,words",
    [
        ("applications:\n  - import_path: a:app\n    deployment: []\n", "c.yaml:3", "unknown key 'deployment'"),
        (
            "applications:\n  - import_path: a:app\n    deployments:\n      - name: M\n        num_replicas: zero\n",
            "c.yaml:5",
            "num_replicas",
        ),
        ("applications:\n  - name: x\n", "c.yaml:2", "needs an import_path"),
        ("applications: [{import_path: a:app}]\nmetrics_port: -3\n", "c.yaml:2", "metrics_port"),
        ("applications: [{import_path: a:app}]\ngrpc_options: {port: 70000}\n", "c.yaml:2", "port"),
        ("applications:\n  - import_path: a:app\n  - import_path: b:app\n", "c.yaml:2", "names must differ"),
        ("applications: [\n", "c.yaml", "not valid YAML"),
        (
            "applications:\n  - import_path: a:app\n    deployments:\n      - name: M\n"
            "        autoscaling_config:\n          max_replica: 3\n",
            "c.yaml:6",
            "unknown key 'max_replica' in autoscaling_config",
        ),
        (
            "applications:\n  - import_path: a:app\n    deployments:\n      - name: M\n"
            "        autoscaling_config: {min_replicas: 4, max_replicas: 2}\n",
            "c.yaml:5",
            "min_replicas (4) must be <= max_replicas (2)",
        ),
        ("applications: [{import_path: a:app}]\nmanagement: {port: 9500}\n", "c.yaml:2", "TLS only"),
        ("applications: [{import_path: a:app}]\nmanagement: {port: 9500, tls: yes}\n", "c.yaml:2", "unknown key 'tls'"),
    ],
)
def test_errors_name_the_file_line_and_key(text, where, words):
    """Each mistake is refused with the file, the line and what is wrong."""
    with pytest.raises(UsageError) as info:
        _config_file.parse(text, "c.yaml")
    assert str(info.value).startswith(where) and words in str(info.value), str(info.value)


def test_an_unknown_deployment_is_refused_naming_the_apps_own(tmp_path, monkeypatch):
    """Options for a deployment the app does not have name the ones it has."""
    (tmp_path / "words_app.py").write_text(_APP)
    config = _config_file.parse(
        "applications:\n  - import_path: words_app:app\n    deployments:\n      - name: Wrods\n        num_replicas: 2\n",
        str(tmp_path / "c.yaml"),
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match=r"c.yaml:4: .* no deployment 'Wrods'; it has: Front, Words"):
        _config_file.applied(config.applications[0], config.base_dir)
    sys.modules.pop("words_app", None)


def test_management_files_are_read_from_the_config_files_folder(tmp_path, tls_files):
    """`management:` paths are relative to the file; their PEM bytes become the
    driver's ManagementOptions, and a missing file is named with its line."""
    folder = tls_files.ca.parent
    config = _config_file.parse(
        "applications: [{import_path: a:app}]\n"
        "management: {port: 9500, host: 0.0.0.0, ssl_certificate_file: server.pem, ssl_private_key_file: server.key}\n",
        str(folder / "c.yaml"),
    )
    assert config.management is not None
    assert (config.management.port, config.management.host) == (9500, "0.0.0.0")
    assert config.management.ssl_certificate == tls_files.server_cert.read_bytes()
    with pytest.raises(UsageError, match=r"c.yaml:2: .*cannot read ssl_private_key_file .*nope.key"):
        _config_file.parse(
            "applications: [{import_path: a:app}]\n"
            "management: {port: 9500, ssl_certificate_file: server.pem, ssl_private_key_file: nope.key}\n",
            str(folder / "c.yaml"),
        )


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamwise.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_run_and_deploy_config_files(tmp_path):
    """`streamwise run FILE` runs each app with the file's options over the code's;
    `streamwise deploy FILE` adds apps to the running driver; a bad file is refused."""
    (tmp_path / "words_app.py").write_text(_APP)
    (tmp_path / "serve.yaml").write_text(
        textwrap.dedent(
            """
            applications:
              - name: first
                import_path: words_app:app
                deployments:
                  - name: Words
                    num_replicas: 2
                    user_config: {word: file}
            metrics_port: 0
            """
        )
    )
    (tmp_path / "more.yaml").write_text("applications:\n  - name: second\n    import_path: words_app:app\n")
    (tmp_path / "bad.yaml").write_text("applications:\n  - name: third\n    import_path: words_app:app\n    deploy: 1\n")
    driver = subprocess.Popen(
        [sys.executable, "-m", "streamwise.cli", "run", "serve.yaml"], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert "is running" in driver.stdout.readline()
        deployed = _cli("deploy", "more.yaml", "--pid", str(driver.pid), cwd=tmp_path)
        assert deployed.returncode == 0, deployed.stderr
        assert "second: RUNNING" in deployed.stdout
        refused = _cli("deploy", "bad.yaml", cwd=tmp_path)
        assert refused.returncode == 1 and "bad.yaml:4: unknown key 'deploy'" in refused.stderr
        status = json.loads(_cli("status", "--json", cwd=tmp_path).stdout)
        apps = {a["name"]: a for a in status["applications"] if a["driver_pid"] == driver.pid}
        assert sorted(apps) == ["first", "second"]
        words = {d["name"]: d for d in apps["first"]["deployments"]}["Words"]
        assert words["running_replicas"] == 2 and words["config"]["user_config"] == {"word": "file"}
        second = {d["name"]: d for d in apps["second"]["deployments"]}["Words"]
        assert second["running_replicas"] == 1 and second["config"]["user_config"] == {"word": "code"}
        assert _cli("shutdown", "first", cwd=tmp_path).returncode == 0
        assert driver.wait(timeout=60) == 0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdout.close()


def test_autoscaling_in_a_file_replaces_the_codes_replica_count(tmp_path, monkeypatch):
    """A file's autoscaling_config makes a fixed deployment autoscaled, and a file's
    num_replicas makes an autoscaled one fixed."""
    (tmp_path / "scaled.py").write_text(textwrap.dedent(
        """
        import streamwise

        @streamwise.deployment(num_replicas=2)
        class Fixed:
            pass

        @streamwise.deployment(num_replicas="auto")
        class Auto:
            def __init__(self, fixed):
                pass

        app = Auto.bind(Fixed.bind())
        """
    ))
    text = (
        "applications:\n  - import_path: scaled:app\n    deployments:\n"
        "      - {name: Fixed, autoscaling_config: {min_replicas: 0, max_replicas: 4}}\n"
        "      - {name: Auto, num_replicas: 3}\n"
    )
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    config = _config_file.load(str(path))
    app = _config_file.applied(config.applications[0], config.base_dir)
    auto = app.deployment._config
    fixed = app.args[0].deployment._config
    assert (auto.num_replicas, auto.autoscaling_config) == (3, None)
    assert fixed.num_replicas is None and fixed.autoscaling_config.max_replicas == 4 and fixed.start_replicas == 0
