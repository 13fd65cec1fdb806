"""The package keeps the behaviour recorded before its adapters and methods were reorganised
(tests/behaviour_record.py): the same logits, GFLOPs, tokens per block and kept tokens."""
import pytest
import torch
from behaviour_record import MODELS, RECORD, observe


@pytest.fixture(scope="module")
def record():
    return torch.load(RECORD)


@pytest.mark.parametrize("name", list(MODELS))
def test_behaviour_matches_the_record(record, name):
    observed = observe(name)
    assert observed.keys() == record[name].keys()
    for label, entries in record[name].items():
        assert observed[label].keys() == entries.keys(), label
        for key, expected in entries.items():
            actual = observed[label][key]
            if expected.is_floating_point():
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"{name} {label} {key}")
            else:
                assert torch.equal(actual, expected), f"{name} {label} {key}"
