"""Every numeric option of every verb is range-checked while parsing: one line, exit 2, no work done.

The parsers are walked, so a verb or option added later is covered without editing this file;
a numeric option declared with a bare ``int``/``float`` fails here (use ``spectrakit._argtypes``).
"""

from __future__ import annotations

import argparse

import pytest

from spectrakit import _argtypes
from spectrakit.cli import build_parser, main

# custom (non-RangeChecker) numeric types and an invalid value for each
CUSTOM_INVALID = {("analyze", "--xmin"): "-1", ("analyze", "--conv-input"): "0x3"}


def _verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _numeric_options() -> list[tuple[str, str, str]]:
    cases = []
    for verb, parser in _verbs().items():
        for action in parser._actions:
            if not action.option_strings:
                continue
            flag = max(action.option_strings, key=len)
            if isinstance(action.type, _argtypes.RangeChecker):
                cases.append((verb, flag, action.type.invalid))
            elif (verb, flag) in CUSTOM_INVALID:
                cases.append((verb, flag, CUSTOM_INVALID[(verb, flag)]))
    return cases


def test_no_numeric_option_is_a_bare_int_or_float():
    bare = [(verb, max(action.option_strings, key=len)) for verb, parser in _verbs().items()
            for action in parser._actions if action.type in (int, float)]
    assert bare == [], f"use a checker from spectrakit._argtypes for {bare}"


def test_every_verb_has_its_numeric_options_walked():
    flags = {(verb, flag) for verb, flag, _ in _numeric_options()}
    assert {("finetune", "--lr"), ("finetune", "--steps"), ("compress", "--ratio"), ("analyze", "--workers"),
            ("analyze", "--xmin"), ("compare", "-k")} <= flags


@pytest.mark.parametrize(("verb", "flag", "value"), _numeric_options())
def test_out_of_range_numeric_option_is_one_line_and_exit_2(verb, flag, value, capsys, tmp_path):
    # a missing --out folder in tmp_path: nothing may be created before the option is refused
    out = tmp_path / "out"
    code = main([verb, f"{flag}={value}", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and value in lines[0], captured.err
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "abc", "-1", "0"])
def test_positive_float_refuses_non_finite_and_non_positive(value):
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        _argtypes.positive_float(value)


def test_checkers_accept_their_range_and_name_it():
    assert _argtypes.positive_int("3") == 3 and _argtypes.nonneg_int("0") == 0
    assert _argtypes.open_fraction("0.5") == 0.5 and _argtypes.unit_fraction("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"\(0, 1\)"):
        _argtypes.open_fraction("1")
    with pytest.raises(argparse.ArgumentTypeError, match="integer"):
        _argtypes.positive_int("2.5")
    assert _argtypes.int_at_least(2).invalid == "1" and _argtypes.float_in(high=3.0).invalid == "4"
