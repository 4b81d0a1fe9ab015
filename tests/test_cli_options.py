"""Every numeric option of every verb is range-checked while parsing: one line, exit 2, no work done.

The parsers are walked, so a verb or option added later is covered without editing this file;
a numeric option declared with a bare ``int``/``float`` fails here (use ``spectrakit._argtypes``).
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from safetensors.torch import save_file

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


# --- an unwritable --out is refused before any work -------------------------------------------

def _argv_with_required(verb: str, parser: argparse.ArgumentParser) -> list[str]:
    """``verb`` plus a value for each required argument (the first choice, else a dummy)."""
    argv = [verb]
    for action in parser._actions:
        if not action.required:
            continue
        value = str(action.choices[0] if action.choices else "x")
        argv += [value] if not action.option_strings else [action.option_strings[0], value]
    return argv


def _verbs_with_out() -> list[str]:
    return [verb for verb, parser in _verbs().items() if any("--out" in a.option_strings for a in parser._actions)]


@pytest.fixture
def spied_runs(monkeypatch):
    """Every verb's ``run`` replaced by a spy that records the verb, so no real work starts."""
    import spectrakit.cli as cli

    calls: list[str] = []
    build = cli.build_parser

    def build_spied() -> argparse.ArgumentParser:
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for verb, verb_parser in sub.choices.items():
            verb_parser.set_defaults(run=lambda args, verb=verb: calls.append(verb) or 0)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_spied)
    return calls


def test_the_verbs_that_write_are_walked():
    assert {"analyze", "compare", "finetune", "compress"} <= set(_verbs_with_out())


@pytest.mark.parametrize("verb", _verbs_with_out())
def test_unwritable_out_fails_before_any_work(verb, tmp_path, capsys, spied_runs):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = _argv_with_required(verb, _verbs()[verb])
    for bad in (blocker / "out", blocker):  # under a regular file; the file itself
        assert main([*argv, "--out", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0] and str(blocker) in err[0], err
    assert spied_runs == []
    good = tmp_path / "new" / "out"
    assert main([*argv, "--out", str(good)]) == 0 and spied_runs == [verb]
    assert not (tmp_path / "new").exists()  # the check leaves no folder behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0o555) folder regardless; "
                    "the path-under-a-file case above covers root")
@pytest.mark.parametrize("verb", _verbs_with_out())
def test_read_only_out_folder_fails_before_any_work(verb, tmp_path, capsys, spied_runs):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main([*_argv_with_required(verb, _verbs()[verb]), "--out", str(folder / "out")]) == 2
    finally:
        folder.chmod(0o755)
    assert "--out" in capsys.readouterr().err and spied_runs == []


def test_analyze_prints_the_table_when_the_write_fails(tmp_path, capsys, monkeypatch):
    from spectrakit.analyze.table import SpectrumTable

    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(20, 10)}, str(path))

    def refuse(self, target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(SpectrumTable, "to_csv", refuse)
    assert main(["analyze", str(path), "--out", str(tmp_path / "out"), "--no-html"]) == 2
    captured = capsys.readouterr()
    assert "a.weight" in captured.out and "Permission denied" in captured.err
