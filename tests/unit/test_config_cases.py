"""fence_virt.conf grammar and lookups: one test per tests/data/config/*.conf.

Each case file starts with `# expect: ok` or `# expect: line N` (the line C fence_virtd 4.12.1
prints as "syntax error on line N"); every verdict was checked against the real C daemon by
tests/tools/capture_vectors.py. Further comment lines in ok cases state lookups:

    # get: <path> = <JSON value or null>        Config.get(path)
    # get_all: <path> = <JSON list>             Config.get_all(path), file order

Grammar and lookup rules: protocol.md §9.1-9.3.
"""

import glob
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fencevirt  # noqa: E402

CONFIG_DIR = os.path.join(ROOT, "tests", "data", "config")
CASE_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.conf")))
EXPECT_RE = re.compile(r"^# expect: (ok|line (\d+))\s*$")
LOOKUP_RE = re.compile(r"^# (get|get_all): (\S+) = (.*)$")


def _read(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8")      # keep CR bytes: err-crlf.conf depends on them


def _expectation(text):
    m = EXPECT_RE.match(text.split("\n", 1)[0].rstrip("\r"))
    assert m, "first line must be '# expect: ok' or '# expect: line N'"
    return None if m.group(1) == "ok" else int(m.group(2))


def _lookups(text):
    for line in text.split("\n"):
        m = LOOKUP_RE.match(line.rstrip("\r"))
        if m:
            yield m.group(1), m.group(2), json.loads(m.group(3))


def test_case_files_present():
    names = [os.path.basename(p) for p in CASE_FILES]
    assert len(names) >= 30
    assert "ok-debian-default.conf" in names and "ok-howto.conf" in names


@pytest.mark.parametrize("path", CASE_FILES, ids=[os.path.basename(p) for p in CASE_FILES])
def test_config_case(path):
    text = _read(path)
    line = _expectation(text)
    if line is not None:
        with pytest.raises(fencevirt.ConfigError) as info:
            fencevirt.parse_config(text, path)
        assert re.search(r"\bline %d\b" % line, str(info.value)), str(info.value)
        return
    cfg = fencevirt.parse_config(text, path)
    for kind, key, want in _lookups(text):
        if kind == "get":
            assert cfg.get(key) == want, key
        else:
            assert list(cfg.get_all(key)) == want, key


def test_ok_cases_state_lookups():
    """Every ok case says what at least one lookup returns."""
    for path in CASE_FILES:
        text = _read(path)
        if _expectation(text) is None:
            assert list(_lookups(text)), os.path.basename(path)


@pytest.mark.parametrize("text", ["", "\n", "   \t  "])
def test_empty_file_is_a_syntax_error_on_line_1_or_2(text):
    # C fence_virtd on a 0-byte file: "syntax error on line 1"
    want = 1 + text.count("\n")
    with pytest.raises(fencevirt.ConfigError) as info:
        fencevirt.parse_config(text, "empty.conf")
    assert re.search(r"\bline %d\b" % want, str(info.value)), str(info.value)


def test_config_error_names_the_line():
    with pytest.raises(fencevirt.ConfigError) as info:
        fencevirt.parse_config('fence_virtd {\n\tlistener = multicast;\n}\n', "x.conf")
    assert re.search(r"\bline 2\b", str(info.value))


def test_missing_paths_return_none():
    cfg = fencevirt.parse_config('fence_virtd { listener = "multicast"; }\n', "x.conf")
    assert cfg.get("fence_virtd/@backend") is None
    assert cfg.get("backends/libvirt/@uri") is None
    assert cfg.get("fence_virtd/@listener") == "multicast"
    assert list(cfg.get_all("groups/group/@ip")) == []


def test_repeated_key_last_wins_and_get_all_in_file_order():
    cfg = fencevirt.parse_config(
        'listeners { multicast { port = "1"; port = "2"; port = "3"; } }\n', "x.conf")
    assert cfg.get("listeners/multicast/@port") == "3"
    assert list(cfg.get_all("listeners/multicast/@port")) == ["1", "2", "3"]


def test_later_block_shadows_earlier_one():
    cfg = fencevirt.parse_config(
        'backends { libvirt { uri = "a"; uri1 = "b"; } }\n'
        'backends { libvirt { uri = "c"; } }\n', "x.conf")
    assert cfg.get("backends/libvirt/@uri") == "c"
    assert cfg.get("backends/libvirt/@uri1") is None
