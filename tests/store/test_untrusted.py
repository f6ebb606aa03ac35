"""What a store hands back is parsed by store/untrusted.py: anything wrong is a
BadValue naming it, never another exception."""

import pytest

from vllm_promptcache.store.untrusted import BadValue, field, hex_list, int_field, json_object


@pytest.mark.parametrize("raw, says", [
    (b"\xff\xfe", "not JSON"),
    (b"{", "not JSON"),
    (b"[" * 100_000, "not JSON"),  # deep enough to exhaust the recursion limit
    (b"[1, 2]", "a list, not an object"),
    (b"null", "a NoneType, not an object"),
    (None, "not JSON"),
])
def test_only_a_json_object_passes(raw, says):
    with pytest.raises(BadValue, match=says):
        json_object(raw, "the entry")
    assert json_object(b'{"a": 1}', "the entry") == {"a": 1}


def test_fields_are_checked_in_type_and_range():
    body = {"n": 3, "flag": True, "s": "x", "keys": ["00" * 4, "ff" * 4]}
    assert field(body, "s", str) == "x"
    assert int_field(body, "n", 0, 3) == 3
    with pytest.raises(BadValue, match="missing"):
        field(body, "absent", str)
    with pytest.raises(BadValue, match="bool, not a int"):
        int_field(body, "flag", 0, 1)  # True is an int to Python, not to a header
    with pytest.raises(BadValue, match=r"outside \[4, 9\]"):
        int_field(body, "n", 4, 9)
    assert hex_list(body, "keys", 4) == (bytes(4), b"\xff" * 4)
    for bad in (["00" * 3], ["zz" * 4], [" 0" + "00" * 3], [7]):
        with pytest.raises(BadValue, match="keys"):
            hex_list({"keys": bad}, "keys", 4)
