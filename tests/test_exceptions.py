import pickle

import pytest

from streamwise import exceptions as exc

SAMPLES = [
    exc.StreamwiseError("boom"),
    exc.UsageError("misuse"),
    exc.UnknownMethodError("Model", "nope", ("a", "b")),
    exc.SerializationError("msgpack", "can not serialize 'object' object"),
    exc.MessageTooLargeError("call arguments", 5_000_000, 4_194_304),
    exc.ObjectLostError("3fa1", "its segment is gone"),
    exc.RemoteError("ValueError", "bad", "Traceback ...", "Model", "generate"),
    exc.DeploymentStartupError("RuntimeError", "no model", "Traceback ...", "Model"),
    exc.UnavailableError("nothing"),
    exc.ReplicaDiedError("Model", "Model#1", "UNAVAILABLE"),
    exc.DeploymentNotFoundError("Model", "shut down"),
    exc.ObjectStoreFullError(600_000, 700_000, 1_000_000),
    exc.BackPressureError("Model", 10, 10),
    exc.RequestTimeoutError("late"),
]


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_pickle_round_trip(error):
    """Every public exception survives pickling with its type, args and message."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.args == error.args
    assert str(copy) == str(error)


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_single_root(error):
    """Every exception streamwise raises derives from StreamwiseError."""
    assert isinstance(error, exc.StreamwiseError)


def test_messages_name_what_is_involved():
    """Messages carry the deployment, method, replica and codec names."""
    assert "Model" in str(exc.UnknownMethodError("Model", "nope", ("a",)))
    assert "nope" in str(exc.UnknownMethodError("Model", "nope", ("a",)))
    assert "msgpack" in str(exc.SerializationError("msgpack", "x"))
    assert "Model#1" in str(exc.ReplicaDiedError("Model", "Model#1"))
    assert "4194304" in str(exc.MessageTooLargeError("call arguments", 5_000_000, 4_194_304))
    assert "1000000" in str(exc.ObjectStoreFullError(600_000, 700_000, 1_000_000))
    text = str(exc.RemoteError("ValueError", "bad", "Traceback: line 3", "Model", "generate"))
    assert "ValueError" in text and "bad" in text and "line 3" in text and "Model.generate" in text
