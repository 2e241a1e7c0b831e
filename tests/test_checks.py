"""The one check style (``odm_sr.checks``): ``<prefix><key>=<value!r>: expected ...`` with the key, the bad value
and what was expected."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from odm_sr.checks import check_bool, check_choice, check_choices, check_number, check_range


@pytest.mark.parametrize(("call", "message"), [
    (lambda: check_choice({"mode": "x"}, "mode", ("a", "b"), "mr."), "mr.mode='x': expected one of ('a', 'b')"),
    (lambda: check_choice({"on": True}, "on", (0, 1)), "on=True: expected one of (0, 1)"),
    (lambda: check_choices({"after_fit": ["a", "t"]}, "after_fit", ("a",), "analyze."),
     "analyze.after_fit=['a', 't']: expected items of ('a',); ['t'] are not"),
    (lambda: check_bool({"x": "yes"}, "x", "fq."), "fq.x='yes': expected true or false"),
    (lambda: check_number({"n": 0}, "n", "data.", positive=True, integer=True),
     "data.n=0: expected a positive integer"),
    (lambda: check_number({"n": 2.0}, "n", "data.", positive=True, integer=True),
     "data.n=2.0: expected a positive integer"),
    (lambda: check_number({"lr": -1e-4}, "lr", "optim."), "optim.lr=-0.0001: expected a non-negative number"),
    (lambda: check_number({"s": -1}, "s", "trainer.", positive=True, hint="steps"),
     "trainer.s=-1: expected a positive number; steps"),
    (lambda: check_range({"j": 50}, "j", 50, 100, "init.", open_low=True),
     "init.j=50: expected a number in (50, 100]"),
    (lambda: check_range({"r": "x"}, "r", 0.0, 1.0, auto=True), "r='x': expected 'auto' or a number in [0.0, 1.0]"),
    # non-finite numbers (issue 22, item 7): inf passes every "> 0" test and nan every "not < 0" one
    (lambda: check_number({"lambda_m": float("inf")}, "lambda_m", "method."),
     "method.lambda_m=inf: expected a non-negative number"),
    (lambda: check_number({"lr": float("nan")}, "lr", "optim.", positive=True),
     "optim.lr=nan: expected a positive number"),
    (lambda: check_range({"x": float("inf")}, "x", 0.0, float("inf")), "x=inf: expected a number in [0.0, inf]"),
])
def test_message_names_key_value_and_expectation(call, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_valid_values_pass_through_from_dicts_and_dictconfigs():
    cfg = OmegaConf.create({"scale": 4, "lr": 1e-4, "batch": 16, "j": 100, "r": "auto", "on": False, "l": ["a"]})
    assert check_choice(cfg, "scale", (2, 3, 4), "model.") == 4
    assert check_number(cfg, "lr", "optim.", positive=True) == 1e-4
    assert check_number(cfg, "batch", positive=True, integer=True) == 16
    assert check_range(cfg, "j", 50, 100, open_low=True) == 100 and check_range(cfg, "r", 0, 1, auto=True) == "auto"
    assert check_bool(cfg, "on") is False and check_choices(cfg, "l", ("a", "b")) == ["a"]
