"""The worker's flags: server defaults of request fields, from named flags and vLLM's
--override-generation-config, checked against the fields' own types and bounds."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import cast

import pytest

from tests.api.test_requests import EXAMPLES
from vdiff_common.protocol import SamplingParams
from vdiff_worker.admission import RENAMED, Admission, Defaults
from vdiff_worker.cli import DEFAULT_FLAGS, build_parser, server_defaults
from vdiff_worker.decoding.fastdllm import Threshold
from vdiff_worker.models.loader import LoadedModel


def defaults(*argv: str) -> Defaults:
    return server_defaults(build_parser().parse_args(list(argv)))


def test_without_flags_the_base_defaults() -> None:
    p = defaults().params
    assert (p.max_tokens, p.block_length, p.decoding, p.threshold) == (128, 32, None, None)


def test_every_field_with_a_server_default_reaches_the_settings() -> None:
    # A field declared in SamplingParams (None when unset) and named in Settings gets a
    # server default through --override-generation-config with nothing else to write.
    over = {k: v for k, v in EXAMPLES.items() if k in Defaults.FIELDS}
    over.pop("decoding", None)  # resolved with the cache, before the settings
    assert len(over) >= 15
    d = defaults("--override-generation-config", json.dumps(over))
    loaded = cast(LoadedModel, SimpleNamespace(kind="llada"))
    s = Admission(loaded, d, frozenset({"main"})).settings(SamplingParams(), Threshold, "dual")
    for name, value in over.items():
        if name != "cache":  # the cache is decided with the decoding, passed in here
            assert getattr(s, RENAMED.get(name, name)) == value, name


def test_named_flags_win_over_the_json() -> None:
    over = '{"block_length": 8, "max_tokens": 64, "cache": "prefix", "remasking": "random"}'
    p = defaults("--block-size", "16", "--override-generation-config", over).params
    assert (p.block_length, p.max_tokens, p.cache, p.remasking) == (16, 64, "prefix", "random")
    for dest, field in DEFAULT_FLAGS.items():
        assert field in Defaults.FIELDS, dest


def test_disable_apd_means_the_reference_unless_a_decoding_is_named() -> None:
    assert defaults("--disable-apd").params.decoding == "reference"
    assert defaults("--disable-apd", "--decoding", "threshold").params.decoding == "threshold"
    over = '{"decoding": "factor"}'
    assert defaults("--disable-apd", "--override-generation-config", over).params.decoding == (
        "factor"
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--apd-threshold", "1.5"], r"--apd-threshold 1.5: .*<= 1.0 - at `\$.threshold`"),
        (["--block-size", "0"], r"--block-size 0: .*>= 1 - at `\$.block_length`"),
        (["--max-tokens", "-3"], r"--max-tokens -3: .*at `\$.max_tokens`"),
        (["--override-generation-config", "{"], "--override-generation-config: "),
        (["--override-generation-config", "[1]"], "--override-generation-config: "),
        (
            ["--override-generation-config", '{"top_p": 0.5}'],
            "'top_p' has no server default; those that do: alg, ",
        ),
        (["--override-generation-config", '{"seed": 1}'], "'seed' has no server default"),
        (["--override-generation-config", '{"colour": 1}'], "'colour' has no server default"),
        (
            ["--override-generation-config", '{"cache": "full"}'],
            r"Expected `str` matching|Invalid enum value 'full' - at `\$.cache`",
        ),
        (
            ["--override-generation-config", '{"threshold": "high"}'],
            r"Expected `float.*`, got `str` - at `\$.threshold`",
        ),
    ],
)
def test_defaults_that_cannot_work_are_refused_naming_them(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        defaults(*argv)


def test_the_json_has_an_environment_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDIFF_OVERRIDE_GENERATION_CONFIG", '{"temperature": 0.5}')
    assert defaults().params.temperature == 0.5
