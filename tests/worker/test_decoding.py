"""The table of decoding strategies: names, the models each decodes, lookups."""

from __future__ import annotations

import pytest

from vdiff_common.protocol import DECODINGS, SamplingParams
from vdiff_worker.decoding import _ALL, strategy_for
from vdiff_worker.decoding.base import UNIVERSAL, ParamError


def test_every_decoding_name_has_a_strategy_and_every_strategy_a_name() -> None:
    assert {cls.name for cls in _ALL} == set(DECODINGS)


def test_each_model_kind_has_one_strategy_per_name() -> None:
    pairs = [(kind, cls.name) for cls in _ALL for kind in cls.kinds]
    assert len(pairs) == len(set(pairs))
    with pytest.raises(ParamError, match="available: apd, reference, threshold"):
        strategy_for("dream", "factor")


def test_every_request_field_is_read_by_a_strategy_or_the_engine() -> None:
    # A field added to SamplingParams that no strategy names would be refused by all of them.
    read = UNIVERSAL.union(*(cls.fields for cls in _ALL))
    assert set(SamplingParams.__struct_fields__) <= read
