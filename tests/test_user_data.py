"""A user's own data and format: every file format, column mapping, conversational prompts,
GSM8K / \\boxed answers, the free layout, system prompts, TRL option names, sampling options,
--eval-size 0, the first step's sample and the saved options (issue 30)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastgrpo.rewards import RewardError
from fastgrpo.rewards.answer import answers_match, gold_answer
from fastgrpo.rewards.free import free_accuracy_reward, free_answer, free_reward_set
from fastgrpo.tasks.data import DataError, load_jsonl, write_jsonl
from fastgrpo.trainer.config import ConfigError, load_config_file, parse_args
from test_run_safety import _main  # main() with the fast options, (exit code, out, err)

datasets = pytest.importorskip("datasets")

ROWS = [{"question": "Tom has 3 apples and buys 4 more. How many apples?",
         "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "level": 1},
        {"question": "A box holds 12 pens; 5 are taken. How many are left?",
         "answer": "12 - 5 = 7 pens are left, then 7 * 2 = 14.\n#### 14", "level": 2},
        {"question": "What is 1,000 + 234?", "answer": "#### 1,234", "level": 3}]


def _write(fmt: str, rows: list[dict], d: Path) -> Path:
    """``rows`` written in ``fmt`` with the writers a user would use (not fastgrpo's)."""
    if fmt == "jsonl":
        write_jsonl(rows, d / "d.jsonl")
        return d / "d.jsonl"
    if fmt == "json":
        (d / "d.json").write_text(json.dumps(rows), encoding="utf-8")
        return d / "d.json"
    ds = datasets.Dataset.from_list(rows)
    if fmt == "parquet":
        ds.to_parquet(str(d / "d.parquet"))
        return d / "d.parquet"
    if fmt == "csv":
        ds.to_csv(str(d / "d.csv"), index=False)
        return d / "d.csv"
    ds.save_to_disk(str(d / "ds"))
    return d / "ds"


FORMATS = ["jsonl", "json", "parquet", "csv", "dataset"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_rows_with_a_column_mapping(tmp_path, fmt):
    path = _write(fmt, ROWS, tmp_path)
    rows = load_jsonl(path, columns={"prompt": "question"})
    assert [r["prompt"] for r in rows] == [r["question"] for r in ROWS]
    assert [r["answer"] for r in rows] == [r["answer"] for r in ROWS]
    # a CSV has no types: its level is the string the file holds
    assert [str(r["level"]) for r in rows] == [str(r["level"]) for r in ROWS]
    assert "question" not in rows[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_names_file_and_row_of_a_missing_column(tmp_path, fmt):
    rows = [dict(r) for r in ROWS]
    rows[1]["question"] = None if fmt in ("parquet", "csv", "dataset") else rows[1]["question"]
    if fmt in ("jsonl", "json"):
        del rows[1]["question"]
    path = _write(fmt, rows, tmp_path)
    with pytest.raises(DataError) as e:
        load_jsonl(path, columns={"prompt": "question"})
    row = {"csv": 3}.get(fmt, 2)  # a CSV's line: the header is line 1
    assert f"{path}:{row}: " in str(e.value)
    if fmt in ("jsonl", "json"):
        assert "missing required field(s) 'question' (--prompt-column)" in str(e.value)
    elif fmt == "csv":  # a CSV cell cannot be null: it is empty
        assert "field 'prompt' is empty" in str(e.value)
    else:  # a table has the column; the row's value is null
        assert "field 'prompt' must be a string" in str(e.value)


def test_missing_prompt_without_a_mapping_lists_the_fields_and_the_option(tmp_path):
    path = _write("jsonl", ROWS, tmp_path)
    with pytest.raises(DataError, match=r"d.jsonl:1: missing required field\(s\) 'prompt'; the row's "
                                        r"fields are 'question', 'answer', 'level': name the one to "
                                        r"read with --prompt-column"):
        load_jsonl(path)


def test_malformed_files_name_the_file_and_row(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[{"prompt": "p", "answer": "1"}, 3]')
    with pytest.raises(DataError, match=r"a.json:2: expected a JSON object, got int"):
        load_jsonl(p)
    p.write_text('[{"prompt": "p",\n "answer": }]')
    with pytest.raises(DataError, match=r"a.json:2: malformed JSON"):
        load_jsonl(p)
    p.write_text('{"prompt": "p", "answer": "1"}\n{"prompt": "q", "answer": 2}\n')  # JSON lines
    assert [r["answer"] for r in load_jsonl(p)] == ["1", "2"]
    q = tmp_path / "b.parquet"
    q.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"b.parquet: cannot read it as parquet"):
        load_jsonl(q)
    c = tmp_path / "c.csv"
    c.write_bytes(b"prompt,answer\ncaf\xe9,1\n")
    with pytest.raises(DataError, match=r"c.csv: (not UTF-8|cannot read)"):
        load_jsonl(c)
    (tmp_path / "k.csv").write_text('prompt,answer,key_steps\np,1,"[1, 2]"\n')
    with pytest.raises(DataError, match=r"k.csv:2: field 'key_steps' must be a list"):
        load_jsonl(tmp_path / "k.csv")
    (tmp_path / "k.csv").write_text('prompt,answer,key_steps\np,1,"[""a"", [""b"", ""c""]]"\n')
    assert load_jsonl(tmp_path / "k.csv")[0]["key_steps"] == [["a"], ["b", "c"]]


def test_a_dataset_dict_directory_names_its_splits(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a DatasetDict with splits train, test; give one split's "
                                        r"folder, e.g. .*dd/train"):
        load_jsonl(tmp_path / "dd", columns={"prompt": "question"})
    assert len(load_jsonl(tmp_path / "dd" / "test", columns={"prompt": "question"})) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: (not a datasets directory|cannot read it)"):
        load_jsonl(tmp_path / "empty")


def test_without_the_datasets_library_the_error_gives_the_install_command(tmp_path, monkeypatch):
    path = _write("parquet", ROWS, tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"d.parquet: reading a parquet file needs the datasets "
                                        r"library; install it with: pip install 'fastgrpo\[data\]'"):
        load_jsonl(path)
    assert len(load_jsonl(_write("json", [{"prompt": "p", "answer": 1}], tmp_path))) == 1


def test_conversational_prompts_go_through_the_chat_template(tmp_path):
    from fastgrpo.tasks.arithmetic import build_tokenizer
    from fastgrpo.trainer.prompting import make_encoder
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has 3 apples"}]
    write_jsonl([{"prompt": msgs, "answer": "3"}, {"prompt": "Tom has 4 apples", "answer": 4}],
                tmp_path / "c.jsonl")
    rows = load_jsonl(tmp_path / "c.jsonl")
    tok = build_tokenizer()
    ids = make_encoder("")(tok, rows[0]["prompt"])
    want = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]
    assert ids == want
    # a system prompt goes first, unless the row has its own
    sys_ids = make_encoder("Be brief.")(tok, rows[1]["prompt"])
    want = tok(tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Tom has 4 apples"}],
                                       add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]
    assert sys_ids == want and make_encoder("Other.")(tok, rows[0]["prompt"]) == ids
    tok.chat_template = None
    with pytest.raises(DataError, match="conversational prompts .* need a tokenizer with a chat template"):
        make_encoder("")(tok, rows[0]["prompt"])
    write_jsonl([{"prompt": [{"role": "robot", "content": "x"}], "answer": "1"}], tmp_path / "b.jsonl")
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'prompt' must be a string or a list of "
                                        r"\{\"role\", \"content\"\} messages"):
        load_jsonl(tmp_path / "b.jsonl")


# ----------------------------------------------------------------------------- answers and layouts


@pytest.mark.parametrize("text, want", [
    ("Tom has now a total of 16 - 8 = 8 apples", "8"),
    ("so 3 + 4 = 7.\n#### 7", "7"),
    ("The total is \\boxed{\\frac{1}{2}} cups", "\\frac{1}{2}"),
    ("First 2 * 3 = 6. The answer is 42 apples.", "42"),
    ("Final answer: $1,234.", "1,234"),
    ("no number here", None),
    ("#### 12\nthen I said 99", "12"),
])
def test_free_answer_reads_the_common_forms(text, want):
    assert free_answer(text) == want


def test_gold_answers_of_gsm8k_and_math_and_the_accuracy_reward():
    assert gold_answer(ROWS[0]["answer"]) == "7" and gold_answer("#### 1,234") == "1,234"
    assert gold_answer("so $x = \\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
    assert gold_answer("plain 5") == "plain 5"
    assert answers_match("7", ROWS[0]["answer"]) and not answers_match("4", ROWS[0]["answer"])
    assert answers_match("1234", "#### 1,234") and answers_match("0.75", "\\boxed{\\frac{3}{4}}")
    comps = ["3 + 4 = 7 apples", "#### 14", "\\boxed{1234}", "The answer is 8", "nothing"]
    refs = [ROWS[0]["answer"], ROWS[1]["answer"], ROWS[2]["answer"], ROWS[0]["answer"], "5"]
    assert free_accuracy_reward(None, comps, refs) == [1.0, 1.0, 1.0, 0.0, 0.0]
    # the R1-VL and tag layouts read a GSM8K gold answer too (the default StepGRPO set)
    from fastgrpo.rewards import default_reward_set
    from fastgrpo.rewards.layout import TAG_LAYOUT
    res = default_reward_set()(["p"] * 2, ["### Step 1: 3 + 4 = 7\n### The final answer is: 7",
                                            "### Step 1: 3 + 4 = 7\n### The final answer is: 8"],
                               answer=[ROWS[0]["answer"]] * 2)
    assert res.per_function["accuracy"] == [1.0, 0.0]
    res = default_reward_set(TAG_LAYOUT)(["p"], ["<think>Step 1: 7</think><answer>#### 7</answer>"],
                                         answer=[ROWS[0]["answer"]])
    assert res.per_function["accuracy"] == [1.0]


def test_the_free_layout_refuses_step_rewards():
    s = free_reward_set()
    assert s.names == ["accuracy", "answer_found"] and s.weights["answer_found"] == 0.0
    assert free_reward_set("accuracy=2").weights == {"accuracy": 2.0}
    with pytest.raises(RewardError, match="reward 'step_rar' needs a layout with steps"):
        free_reward_set("accuracy,step_rar")
    with pytest.raises(RewardError, match="weight 'x' of reward spec entry"):
        free_reward_set("accuracy=x")


def test_layout_and_system_prompt_options(tmp_path):
    from fastgrpo.rewards import R1VL_LAYOUT, R1VL_MULTIMODAL_LAYOUT, TAG_LAYOUT
    from fastgrpo.trainer.presets import get_preset
    from fastgrpo.trainer.prompting import LAYOUT_INSTRUCTIONS, resolve_layout, system_prompt
    assert resolve_layout("") is R1VL_LAYOUT and resolve_layout("", vision=True) is R1VL_MULTIMODAL_LAYOUT
    assert resolve_layout("", get_preset("smollm2-135m")) is TAG_LAYOUT
    assert resolve_layout("r1vl", get_preset("smollm2-135m")) is R1VL_LAYOUT
    assert resolve_layout("free") == "free"
    assert system_prompt(parse_args([])) == ""
    assert system_prompt(parse_args(["--layout", "tags"])) == LAYOUT_INSTRUCTIONS["tags"]
    assert system_prompt(parse_args(["--layout", "tags", "--system-prompt", "S"])) == "S"
    f = tmp_path / "sys.txt"
    f.write_text("From a file.\n")
    assert system_prompt(parse_args(["--system-prompt-file", str(f)])) == "From a file."
    for argv, msg in ((["--layout", "boxed"], "invalid --layout 'boxed': choose one of r1vl, tags, free"),
                      (["--system-prompt", "a", "--system-prompt-file", str(f)], "not both"),
                      (["--system-prompt-file", str(tmp_path / "no")], "file not found"),
                      (["--prompt-column", " "], "invalid --prompt-column ' ': names no column"),
                      (["--min-p", "1"], "invalid --min-p 1.0: must be in [0, 1)"),
                      (["--top-k", "-1"], "invalid --top-k -1: must be >= 0"),
                      (["--repetition-penalty", "0"], "invalid --repetition-penalty 0.0"),
                      (["--eval-size", "-1"], "invalid --eval-size -1")):
        with pytest.raises(ConfigError) as e:
            parse_args(argv)
        assert msg in str(e.value)


# ----------------------------------------------------------------------------- TRL names


def test_trl_names_on_the_command_line_and_in_config_files(tmp_path):
    cfg = parse_args(["--num-generations", "4", "--learning-rate", "1e-5", "--max-completion-length",
                      "32", "--max-steps=7", "--epsilon", "0.3", "--scale-rewards", "false",
                      "--use-vllm", "--output-dir", "o"])
    assert (cfg.group_size, cfg.lr, cfg.max_new_tokens, cfg.steps, cfg.epsilon_low,
            cfg.scale_rewards, cfg.rollout, cfg.out_dir) == (4, 1e-5, 32, 7, 0.3, "none", "vllm", "o")
    toml = tmp_path / "c.toml"
    toml.write_text("num_generations = 6\nlearning_rate = 2e-5\nmax_completion_length = 48\n"
                    "scale_rewards = true\nmask_truncated_completions = false\n")
    assert load_config_file(str(toml)) == {"group_size": 6, "lr": 2e-5, "max_new_tokens": 48,
                                           "scale_rewards": "group", "mask_truncated": False}
    toml.write_text("per_device_train_batch_size = 8\n")
    with pytest.raises(ConfigError, match=r"c.toml: option 'per_device_train_batch_size' .* did you "
                                          r"mean `--prompts-per-step`\?"):
        load_config_file(str(toml))
    toml.write_text("group_sise = 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'group_sise'; did you mean `--group-size`\?"):
        load_config_file(str(toml))
    with pytest.raises(ConfigError, match=r"did you mean `--micro-batch-tokens`\?"):
        parse_args(["--gradient-accumulation-steps", "4"])
    with pytest.raises(ConfigError, match=r"unknown option '--num-generation'; did you mean `--group-size`\?"):
        parse_args(["--num-generation", "4"])
    assert parse_args(["--group", "3"]).group_size == 3  # argparse's abbreviations still work


def test_refused_trl_option_exits_2_with_the_hint(capsys):
    code, _, err = _main(capsys, "--per-device-train-batch-size", "8")
    assert code == 2 and "error: option '--per-device-train-batch-size'" in err
    assert "did you mean `--prompts-per-step`?" in err


# ----------------------------------------------------------------------------- sampling


def test_sampling_shapes_match_transformers_logits_processors():
    from transformers.generation.logits_process import (MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        TopKLogitsWarper)
    from fastgrpo.trainer.rollout import _Shaping
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, 50, (5, 7), generator=g)
    seen = torch.zeros(5, 50, dtype=torch.bool).scatter_(1, ids, True)
    for k, mp, rp in ((7, 0.0, 1.0), (0, 0.1, 1.0), (0, 0.0, 1.3), (5, 0.05, 1.5)):
        got = _Shaping(k, mp, rp).penalize(logits.clone(), seen)
        want = logits.clone()
        if rp != 1.0:
            want = RepetitionPenaltyLogitsProcessor(rp)(ids, want)
        if k:
            want = TopKLogitsWarper(k)(ids, want)
        if mp:
            want = MinPLogitsWarper(mp)(ids, want)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        fin = torch.isfinite(want)
        assert torch.allclose(got[fin], want[fin])


def test_stop_strings_end_completions_and_they_count_as_finished():
    from fastgrpo.tasks.arithmetic import make_splits
    from fastgrpo.tasks.tokenizer import encode_prompt
    from fastgrpo.trainer.policy import load_model
    from fastgrpo.trainer.rollout import generate
    model, tok = load_model()
    rows = make_splits(0)[1][:3]
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    plain = generate(model, tok, prompts, do_sample=False, max_new_tokens=40)
    assert all("Step 2" in t for t in plain.texts)
    ro = generate(model, tok, prompts, do_sample=False, max_new_tokens=40, stop=["Step 2"])
    for full, s in zip(plain.texts, ro.samples):
        assert s.text.endswith("Step 2") and full.startswith(s.text) and not s.truncated
    torch.manual_seed(0)
    ro = generate(model, tok, prompts, group_size=3, do_sample=True, max_new_tokens=40,
                  stop=["Step 2"], top_k=5, min_p=0.05, repetition_penalty=1.2)
    assert all(s.text.endswith("Step 2") or s.truncated or s.completion_ids[-1] == tok.eos_token_id
               for s in ro.samples)
    assert all(s.text.count("Step 2") <= 1 for s in ro.samples)


# ----------------------------------------------------------------------------- a whole run


def test_gsm8k_parquet_run_free_layout_no_eval_first_sample_and_saved_options(tmp_path, capsys):
    path = _write("parquet", ROWS, tmp_path)
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--train-file", str(path), "--prompt-column", "question",
                         "--layout", "free", "--eval-size", "0", "--sample-every", "10",
                         "--num-generations", "2", "--top-k", "20", "--stop", "\n\n",
                         "--out-dir", str(out))
    assert code == 0, err
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] and samples[0]["prompt"] in [r["question"] for r in ROWS]
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "rewards/answer_found/mean" in m and "rewards/step_rar/mean" not in m
    for where in (out / "args.json", out / "model" / "args.json"):
        saved = json.loads(where.read_text())
        assert (saved["layout"], saved["prompt_column"], saved["top_k"], saved["stop"]) == \
            ("free", "question", 20, ["\n\n"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_before"]["accuracy"] is None  # no held-out rows: nothing evaluated
    code, _, err = _main(capsys, "--train-file", str(path), "--out-dir", str(tmp_path / "p"))
    assert code == 2 and f"error: {path}:1: missing required field(s) 'prompt'" in err
    code, _, err = _main(capsys, "--train-file", str(path), "--prompt-column", "question",
                         "--layout", "free", "--rewards", "step_rar", "--out-dir", str(tmp_path / "q"))
    assert code == 2 and "error: " in err and "needs a layout with steps" in err


def test_image_columns_of_a_parquet_file_arrive_as_pil_images(tmp_path):
    from PIL import Image
    imgs = [Image.new("RGB", (4 + i, 3), (10 * i, 20, 30)) for i in range(2)]
    ds = datasets.Dataset.from_dict({"q": ["What colour?", "How wide?"], "answer": ["red", "5"],
                                     "picture": imgs}, features=datasets.Features(
        {"q": datasets.Value("string"), "answer": datasets.Value("string"), "picture": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "vl.parquet"))
    rows = load_jsonl(tmp_path / "vl.parquet", columns={"prompt": "q", "image": "picture"})
    for r, im in zip(rows, imgs):
        assert hasattr(r["image"], "convert") and r["image"].size == im.size
        assert r["image"].convert("RGB").getpixel((0, 0)) == im.getpixel((0, 0))
