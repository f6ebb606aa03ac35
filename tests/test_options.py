"""Every option is written once, as a PromptCacheConfig field: the CLI group, FLAGS
and the README's options table are generated from the fields."""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from pathlib import Path

import pytest

from vllm_promptcache.config import (FLAGS, PromptCacheConfig, options_table)
from vllm_promptcache.plugin import Redacted, _overrides, add_promptcache_args

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- options-table:begin -->", "<!-- options-table:end -->"


def parser() -> argparse.ArgumentParser:
    return add_promptcache_args(argparse.ArgumentParser())


def test_the_readme_options_table_is_the_generated_one():
    text = README.read_text()
    assert BEGIN in text and END in text, f"README.md lacks the {BEGIN} ... {END} markers"
    between = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert between.strip() == options_table().strip(), (
        "README's options table differs from the fields: paste the output of "
        "`python -m vllm_promptcache.config --options-table` between the markers")


def test_every_field_has_a_flag_help_and_a_row():
    table = options_table()
    for f in dataclasses.fields(PromptCacheConfig):
        assert f.metadata["flag"].startswith("--promptcache-") and f.metadata["help"]
        assert f"`{f.name}` / `PROMPTCACHE_{f.name.upper()}`" in table
    assert len(set(FLAGS.values())) == len(FLAGS)
    dests = {a.dest for a in parser()._actions}
    assert {f"promptcache_{n}" for n in FLAGS} <= dests


def test_boolean_options_are_on_off_flags():
    args = parser().parse_args(["--promptcache-position-independent",
                                "--no-promptcache-save-decode-tokens"])
    over = _overrides(args)
    assert over["position_independent"] is True and over["save_decode_tokens"] is False
    assert over["truncate"] is None, "an unset flag leaves the YAML/env value alone"
    with pytest.raises(SystemExit):
        parser().parse_args(["--promptcache-truncate", "maybe"])


def test_secret_flags_never_show_their_value():
    url = "redis://user:hunter2-pw@127.0.0.1:6379/0"
    args = parser().parse_args(["--promptcache-admin-key", "admin-0123456789abcdef",
                                "--promptcache-remote-secret", "s3cret-0123456789abcdef",
                                "--promptcache-remote-url", url])
    shown = repr(args) + str(vars(args)) + repr(pickle.loads(pickle.dumps(args)))
    for secret in ("admin-0123456789abcdef", "s3cret-0123456789abcdef", "hunter2-pw"):
        assert secret not in shown
    assert "redis://user:***@127.0.0.1:6379" in shown
    over = _overrides(args)
    assert (over["admin_key"], over["remote_url"]) == ("admin-0123456789abcdef", url)
    assert isinstance(args.promptcache_remote_secret, Redacted)


def test_help_names_allowed_values_default_and_variable():
    text = re.sub(r"\s+", " ", parser().format_help())
    assert "--promptcache-host-gb GIB Host-RAM tier size" in text
    assert "Allowed: a number of GiB in (0, 4096]. Default: 4. Env: PROMPTCACHE_HOST_GB." in text
    assert "--promptcache-truncate, --no-promptcache-truncate" in text or \
        "--promptcache-truncate | --no-promptcache-truncate" in text
