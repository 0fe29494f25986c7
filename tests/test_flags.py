"""Issue 12: a flag the user gives always wins over the stage and tiny-model defaults, even when its value equals the
dataclass default (which used to read as "not given")."""
import pytest

import ares


@pytest.fixture(autouse=True)
def data_file(tmp_path, monkeypatch):
    """--data x.jsonl must exist: parse_config checks the paths (issue 15) before anything loads."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text("")


@pytest.mark.parametrize("flags, field, expected", [
    (["--window", "4"], "window", 4),                      # 4 is the dataclass default; tiny AEPO's default is 1
    ([], "window", 1),                                     # not given: the tiny AEPO default
    (["--max-prompt-len", "4096"], "max_prompt_len", 4096),  # dataclass default; tiny default 256
    ([], "max_prompt_len", 256),
])
def test_an_explicit_flag_wins_even_when_it_equals_the_dataclass_default(flags, field, expected):
    cfg = ares.parse_config(["--model", "tiny", "--stage", "aepo", "--data", "x.jsonl", *flags])
    assert getattr(ares.resolve_stage_defaults(cfg, "aepo"), field) == expected


def test_stage_defaults_fill_what_was_not_given_and_a_caller_set_value_still_wins():
    cfg = ares.parse_config(["--model", "tiny", "--stage", "aepo", "--data", "x.jsonl", "--lr", "0.001"])
    assert cfg.given == ("data", "lr", "model", "stage")
    aepo = ares.resolve_stage_defaults(cfg, "aepo")
    assert (aepo.lr, aepo.window, aepo.batch_size, aepo.steps) == (1e-3, 1, 16, 150)  # lr given, the rest tiny AEPO
    cold = ares.resolve_stage_defaults(ares.Config(model="tiny", steps=7), "coldstart")  # a programmatic value
    assert (cold.steps, cold.lr, cold.window) == (7, 2e-3, 4)
    paper = ares.resolve_stage_defaults(ares.parse_config(["--model", "some/hub-model", "--data", "x", "--stage",
                                                           "aepo", "--lr", "1e-6"]), "aepo")
    assert (paper.lr, paper.batch_size, paper.window, paper.max_prompt_len) == (1e-6, 512, 4, 4096)
