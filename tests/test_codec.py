import pytest

from streamwise import codec
from streamwise.exceptions import SerializationError, UsageError

PLAIN = [None, True, 3, 2.5, "text", [1, "a"], {"k": [1, 2]}]


@pytest.mark.parametrize("name", sorted(codec.CODECS))
def test_round_trip_plain_data(name):
    """Every codec round-trips plain data unchanged."""
    c = codec.get_codec(name)
    for value in PLAIN:
        assert c.loads(c.dumps(value)) == value


def test_cloudpickle_carries_functions():
    """cloudpickle (the default) carries lambdas, which plain pickle cannot."""
    c = codec.get_codec("cloudpickle")
    assert c.loads(c.dumps(lambda x: x + 1))(1) == 2
    with pytest.raises(SerializationError, match="pickle"):
        codec.get_codec("pickle").dumps(lambda x: x)


@pytest.mark.parametrize("name", ["msgpack", "orjson"])
def test_data_codecs_reject_objects_naming_themselves(name):
    """A value a data codec cannot encode raises SerializationError naming the codec."""
    with pytest.raises(SerializationError, match=name):
        codec.get_codec(name).dumps(object())


def test_msgpack_carries_bytes():
    """msgpack keeps bytes as bytes."""
    c = codec.get_codec("msgpack")
    assert c.loads(c.dumps(b"\x00\x01")) == b"\x00\x01"


def test_unknown_codec_lists_known_ones():
    """Asking for an unknown codec names the known codecs."""
    with pytest.raises(UsageError, match="cloudpickle"):
        codec.get_codec("yaml")
