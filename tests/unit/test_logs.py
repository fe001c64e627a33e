"""csi/logs.py: the JSON and text formats, pure (records in, lines out), and configure()."""

import io
import json
import logging
import re
import sys

import pytest

from csi import logs

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(msg="NodePublishVolume ok", level=logging.INFO, exc_info=None, **extra):
    r = logging.LogRecord("csi.rpc", level, __file__, 1, msg, (), exc_info)
    r.created, r.msecs = 1735787045.678, 678.0  # 2025-01-02T03:04:05.678Z
    for k, v in extra.items():
        setattr(r, k, v)
    return r


FIELDS = {"method": "NodePublishVolume", "volume_id": "vol-1", "target": "/pods/a b/mount",
          "pod": "team/web-0", "code": "OK", "duration_seconds": 0.012345}


def test_json_is_one_object_with_stable_keys_first():
    line = logs.JsonFormatter().format(record(**FIELDS))
    assert "\n" not in line
    obj = json.loads(line)
    assert list(obj)[:4] == ["ts", "level", "logger", "msg"]
    assert obj["ts"] == "2025-01-02T03:04:05.678Z"
    assert (obj["level"], obj["logger"], obj["msg"]) == ("INFO", "csi.rpc",
                                                          "NodePublishVolume ok")
    assert {k: obj[k] for k in FIELDS} == FIELDS  # numbers stay numbers
    assert "exc" not in obj


def test_json_keeps_a_traceback_on_the_same_line():
    try:
        raise KeyError("oops\nsecond line")
    except KeyError:
        r = record(level=logging.ERROR, exc_info=sys.exc_info())
    line = logs.JsonFormatter().format(r)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["exc"].startswith("Traceback") and "KeyError" in obj["exc"]


def test_json_message_with_newlines_and_odd_values_is_still_one_line():
    line = logs.JsonFormatter().format(record(msg="a\nb", layers=2, path=object(),
                                              level_name="x"))
    obj = json.loads(line)
    assert obj["msg"] == "a\nb" and obj["layers"] == 2 and obj["path"].startswith("<object")


def test_json_fields_never_replace_the_four_keys():
    obj = json.loads(logs.JsonFormatter().format(record(ts="fake", level_x=1)))
    assert obj["ts"] == "2025-01-02T03:04:05.678Z"


def test_text_appends_the_same_fields_as_key_value():
    line = logs.TextFormatter().format(record(**FIELDS))
    assert line == ('2025-01-02T03:04:05.678Z INFO csi.rpc: NodePublishVolume ok '
                    'method=NodePublishVolume volume_id=vol-1 target="/pods/a b/mount" '
                    'pod=team/web-0 code=OK duration_seconds=0.012345')


@pytest.mark.parametrize("value, text", [
    ("plain", "plain"), ("", '""'), ("a b", '"a b"'), ('say "hi"', '"say \\"hi\\""'),
    ("k=v", '"k=v"'), (3, "3"), (0.5, "0.5"), (True, "true"), ("é", "é"),
])
def test_text_values_are_quoted_when_needed(value, text):
    assert logs.text_value(value) == text


def test_text_puts_a_traceback_below_its_line():
    try:
        raise ValueError("bad")
    except ValueError:
        r = record(level=logging.ERROR, exc_info=sys.exc_info(), code="INTERNAL")
    first, *rest = logs.TextFormatter().format(r).splitlines()
    assert first.endswith("code=INTERNAL")
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: bad"


def test_a_record_without_fields_is_just_the_message():
    assert logs.TextFormatter().format(record(msg="serving")).endswith("csi.rpc: serving")
    assert set(json.loads(logs.JsonFormatter().format(record()))) == {
        "ts", "level", "logger", "msg"}


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_configure_writes_one_json_line_per_record(restore_root):
    out = io.StringIO()
    logs.configure("INFO", "json", out)
    log = logging.getLogger("csi.test_logs")
    log.debug("hidden")
    log.info("pulled %s", "app", extra={"image": "app", "seconds": 1.5})
    log.warning("careful")
    lines = out.getvalue().splitlines()
    assert [json.loads(x)["msg"] for x in lines] == ["pulled app", "careful"]
    assert json.loads(lines[0])["image"] == "app"
    assert TS.fullmatch(json.loads(lines[0])["ts"])


def test_configure_again_replaces_its_own_handler_only(restore_root):
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    logs.configure("INFO", "text", first)
    logs.configure("WARNING", "json", second)
    logging.getLogger("csi.test_logs").warning("once")
    assert first.getvalue() == "" and json.loads(second.getvalue())["msg"] == "once"
    assert other in logging.getLogger().handlers


def test_configure_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="text, json"):
        logs.configure("INFO", "yaml")
