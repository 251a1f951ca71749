"""reward_set_from_spec: reward sets from ``"name[=weight],..."``; every expected total is
worked out in a comment."""

import sys

import pytest

import fastgrpo.rewards as R
from fastgrpo.rewards import RewardError, reward_set_from_spec

CORRECT = """### Image Description:
Two boxes of apples.
### Rationales:
Multiply, then add.
### Step 1: 3 * 4 = 12
### Step 2: 12 + 5 = 17
### The final answer is: 17"""
WRONG = CORRECT.replace("is: 17", "is: 18")
NO_ANSWER = CORRECT.rsplit("\n### The final answer is:", 1)[0]
KS = [["3*4=12"], ["12+5=17"], ["12-5=7"]]  # soft matching finds groups 1 and 2: k = 2/3
COMPS = [CORRECT, WRONG, NO_ANSWER]
COLS = dict(answer=["17"] * 3, key_steps=[KS] * 3)
K = 0.1 * 2 / 3


def totals(spec, **kw):
    return reward_set_from_spec(spec, **kw)(None, COMPS, **COLS).total


def test_outcome_only_grpo():
    # accuracy: 1, 0, 0
    rs = reward_set_from_spec("accuracy")
    assert rs.names == ["accuracy"] and rs.weights == {"accuracy": 1.0}
    assert totals("accuracy") == [1.0, 0.0, 0.0]


def test_stepgrpo_equals_default_reward_set():
    # StepRAR + StepRVR (paper form): CORRECT (1 + k) + 1, WRONG k + 1, NO_ANSWER 0 + 0
    assert totals("step_rar,step_rvr") == pytest.approx([2 + K, 1 + K, 0.0])
    assert totals("step_rar,step_rvr") == R.default_reward_set()(None, COMPS, **COLS).total
    # with the logging-only members at weight 0 it is the default set, member by member
    full = reward_set_from_spec("step_rar,step_rvr,accuracy=0,step_k=0")
    default = R.default_reward_set()
    assert full.weights == default.weights
    assert full(None, COMPS, **COLS).per_function == default(None, COMPS, **COLS).per_function


def test_weights_and_a_module_function():
    mod = type(sys)("_spec_test_rewards")
    mod.two = lambda prompts, completions, **kw: [2.0] * len(completions)
    mod.two.__name__ = "two"
    sys.modules["_spec_test_rewards"] = mod
    try:
        # step_rar + 0.5 step_rvr + 2 * 2: CORRECT 1 + k + 0.5 + 4, WRONG k + 0.5 + 4, NO_ANSWER 0 + 0 + 4
        spec = "step_rar=1, step_rvr=0.5 ,_spec_test_rewards:two=2"
        assert totals(spec) == pytest.approx([5.5 + K, 4.5 + K, 4.0])
        assert reward_set_from_spec(spec).names == ["step_rar", "step_rvr", "two"]
        # a list of entries is the same
        assert totals(["step_rar=1", "step_rvr=0.5", "_spec_test_rewards:two=2"]) == totals(spec)
    finally:
        del sys.modules["_spec_test_rewards"]


def test_a_file_function(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length(prompts, completions, **kw):\n    return [len(c) / 100 for c in completions]\n")
    rs = reward_set_from_spec(f"{f}:length=-1,accuracy")
    assert rs.names == ["length", "accuracy"]
    # -len/100 + accuracy
    assert rs(None, COMPS, **COLS).total == pytest.approx([1 - len(CORRECT) / 100, -len(WRONG) / 100, -len(NO_ANSWER) / 100])


def test_published_code_builtins():
    # step_rar_code: 1[correct] + 0.1 k with the substring test: "3*4=12" etc. are not in
    # "3 * 4 = 12": k = 0; NO_ANSWER is correct for math-verify (the last "= 17")
    # step_rvr_code: 1, 1, 0 (no answer header)
    assert totals("step_rar_code,step_rvr_code") == [2.0, 1.0, 1.0]
    ks = [["3 * 4 = 12"], ["12 + 5 = 17"]]  # literal: k = 1
    out = reward_set_from_spec("step_rar_code")(None, COMPS, answer=["17"] * 3, key_steps=[ks] * 3).total
    assert out == pytest.approx([1.1, 0.1, 1.1])


def test_layout_reaches_the_builtins():
    # TAG_LAYOUT: these ### completions have no <answer>, so accuracy is 0 everywhere
    assert totals("accuracy", layout=R.TAG_LAYOUT) == [0.0, 0.0, 0.0]
    tag = "<think>Step 1: 3*4=12\nStep 2: 12+5=17</think><answer>17</answer>"
    rs = reward_set_from_spec("step_rar,step_rvr", layout=R.TAG_LAYOUT)
    # k = 2/3, correct -> 1 + k; complete and logical -> 1
    assert rs(None, [tag], answer=["17"], key_steps=[KS]).total == pytest.approx([2 + K])
    assert rs.funcs["step_rar"].__name__ == "step_rar"


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("", r"empty reward spec ''"),
        (" , ", r"empty reward spec"),
        ([], r"empty reward spec"),
        ("step_rar,,step_rvr", r"empty reward spec entry '' in 'step_rar,,step_rvr'"),
        ("step_rar,", r"empty reward spec entry ''"),
        ("=2", r"empty reward spec entry '=2'"),
        ("step_rar,nope=2", r"unknown reward 'nope' in spec entry 'nope=2'; builtins: accuracy, step_rar, step_rvr, step_k, step_rar_code, step_rvr_code"),
        ("step_rar=x", r"weight 'x' of reward spec entry 'step_rar=x' is not a number"),
        ("step_rar=", r"weight '' of reward spec entry 'step_rar=' is not a number"),
        ("step_rar=1=2", r"weight '1=2' of reward spec entry 'step_rar=1=2' is not a number"),
        ("step_rar=nan", r"weight 'nan' of reward spec entry 'step_rar=nan' is not finite"),
        ("step_rar=-inf", r"weight '-inf' of reward spec entry 'step_rar=-inf' is not finite"),
        ("step_rar,step_rvr,step_rar=2", r"reward 'step_rar' given twice .* \(entries 'step_rar' and 'step_rar=2'\)"),
        (
            "fastgrpo.rewards:step_rvr_reward,fastgrpo.rewards.functions:step_rvr_reward",
            r"reward 'step_rvr_reward' given twice",
        ),
        ("no_such_module_xyz:f=2", r"reward spec entry 'no_such_module_xyz:f=2': cannot import module 'no_such_module_xyz'"),
        ("fastgrpo.rewards:nope", r"reward spec entry 'fastgrpo.rewards:nope': module 'fastgrpo.rewards' has no attribute 'nope'"),
        ("fastgrpo.rewards:BACKENDS", r"reward spec entry 'fastgrpo.rewards:BACKENDS': .* is not callable"),
        ("no/such/file.py:f", r"reward spec entry 'no/such/file.py:f': no file 'no/such/file.py'"),
        (["step_rar", 3], r"reward spec entry 3 is not a string"),
    ],
)
def test_errors_name_the_entry(spec, pattern):
    with pytest.raises(RewardError, match=pattern):
        reward_set_from_spec(spec)


def test_file_that_fails_to_load(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardError, match=r"loading .*broken.py.* failed: RuntimeError: boom"):
        reward_set_from_spec(f"accuracy,{f}:fn")


def test_load_reward_function_from_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "r.py").write_text("def f(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    (b / "r.py").write_text("def f(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    # two files of the same name are two modules; loading one again reuses it
    fa, fb = R.load_reward_function(f"{a / 'r.py'}:f"), R.load_reward_function(f"{b / 'r.py'}:f")
    assert fa(None, ["x"]) == [1.0] and fb(None, ["x"]) == [2.0]
    assert R.load_reward_function(f"{a / 'r.py'}:f") is fa
    assert R.RewardSet({"a": fa, "b": fb})(None, ["x"]).total == [3.0]
    # the function follows the last ':' (a path may hold others, as on Windows)
    c = tmp_path / "c:d"
    c.mkdir()
    (c / "r.py").write_text("def g(prompts, completions, **kw):\n    return [3.0] * len(completions)\n")
    assert reward_set_from_spec(f"{c / 'r.py'}:g=2")(None, ["x"]).total == [6.0]
