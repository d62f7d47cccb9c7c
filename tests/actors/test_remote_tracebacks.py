"""Remote tracebacks name the user's real file and show its source lines.

Deployment classes are usually pickled by value (the decorator rebinds the class's
name, so it cannot be found by import); whatever the cloudpickle release does to code
it pickles by value, the replica's traceback must still point at the user's file.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import streamwise
from streamwise import codec
from streamwise.exceptions import DeploymentStartupError, RemoteError


def _nested():
    def inner():
        return 1

    return inner


def test_code_pickled_by_value_keeps_its_file_name():
    """A function carried by value, and the functions defined inside it, keep co_filename."""
    c = codec.get_codec("cloudpickle")
    local = lambda: _nested  # noqa: E731 - a lambda is never found by import: by value
    copy = c.loads(c.dumps(local))
    assert copy is not local
    assert copy.__code__.co_filename == __file__
    assert copy.__code__.co_firstlineno == local.__code__.co_firstlineno
    nested = c.loads(c.dumps(_nested()))
    assert nested.__code__.co_filename == __file__


def test_method_of_a_local_class_names_this_file(serve):
    """An exception in a method of a class defined in a function shows this file and line."""

    @streamwise.deployment
    class Local:
        def fail(self):
            raise ValueError("local class failed")

    handle = serve(Local.bind())
    with pytest.raises(RemoteError) as info:
        handle.fail.remote().result()
    text = info.value.remote_traceback
    assert f'File "{__file__}"' in text, text
    assert 'raise ValueError("local class failed")' in text, text


def test_constructor_of_a_module_on_the_path_names_its_file(serve, tmp_path, monkeypatch):
    """A deployment imported from a module on sys.path reports that module's file and source."""
    module = tmp_path / "tb_weights_module.py"
    module.write_text(
        textwrap.dedent(
            """
            import streamwise

            @streamwise.deployment(max_constructor_attempts=1)
            class Weights:
                def __init__(self):
                    raise OSError("weights file missing")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import tb_weights_module

    try:
        with pytest.raises(DeploymentStartupError) as info:
            serve(tb_weights_module.Weights.bind())
    finally:
        sys.modules.pop("tb_weights_module", None)
    text = info.value.remote_traceback
    assert f'File "{module}"' in text, text
    assert 'raise OSError("weights file missing")' in text, text


def test_script_run_as_main_names_the_script(tmp_path):
    """A class defined in a script started with ``python app.py`` shows the script's lines."""
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import streamwise
            from streamwise.exceptions import RemoteError

            @streamwise.deployment
            class App:
                def fail(self):
                    raise KeyError("no such user")

            handle = streamwise.run(App.bind())
            try:
                handle.fail.remote().result()
            except RemoteError as exc:
                print(exc.remote_traceback)
            streamwise.shutdown()
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert f'File "{script}"' in out.stdout, out.stdout
    assert 'raise KeyError("no such user")' in out.stdout, out.stdout
