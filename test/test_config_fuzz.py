"""Property-based bad input: any document, any value for any key -> a clean error, never a traceback."""

import contextlib
import io
import re

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import vtunnel
from vtunnel import ConfigError, parse_config

VALID = {"name": "t", "handshake-port": 9090, "vsock-host-port": 8989, "peer-address": "127.0.0.1",
         "peer-port": 3030, "upstream-server-address": "127.0.0.1:4444"}

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
                    st.binary(max_size=10))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=10)
ERROR_LINE = re.compile(r"^c\.yaml(:\d+)?: \S")


def outcome(text):
    """Parse; return the tunnels or the ConfigError. Anything else escapes and fails the test."""
    try:
        return parse_config(text, "c.yaml")
    except ConfigError as exc:
        assert exc.errors and all(ERROR_LINE.match(e) and "\n" not in e for e in exc.errors), exc.errors
        return exc


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_config_or_a_clean_error(text):
    outcome(text)


@settings(max_examples=300, deadline=None)
@given(values)
def test_any_yaml_document_is_a_config_or_a_clean_error(document):
    outcome(yaml.safe_dump(document))
    outcome(yaml.safe_dump({"tunnel": document}))
    outcome(yaml.safe_dump({"tunnel": [document]}))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(vtunnel.KEYS)), values)
def test_any_value_for_any_key_is_accepted_or_named(key, value):
    entry = dict(VALID, **{key: value})
    result = outcome(yaml.safe_dump({"tunnel": [entry]}))
    if isinstance(result, ConfigError):
        assert any(f"'{key}'" in e or key in e for e in result.errors), (key, value, result.errors)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=100), values.map(yaml.safe_dump)))
def test_the_command_line_exits_2_with_one_line_per_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = vtunnel.main(["check", "--config-path", str(path)])
    assert code in (0, 2)  # main raising instead (what would print a traceback) fails the test
    if code == 2:
        assert all(line.startswith("vtunnel: ") for line in err.getvalue().splitlines())
