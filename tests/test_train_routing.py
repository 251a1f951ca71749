"""``python -m fastgrpo.train --task routing`` end to end at a tiny size: the offline step-state
form and the online multi-turn form, the built-in task and user JSONL, bad input (exit 2)."""

import json

import pytest

from fastgrpo.tasks import routing as T
from fastgrpo.trainer.loop import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny routing model after a few warm-up steps on the offline rows (seconds)."""
    from fastgrpo.tasks.tiny_model import build_tiny_model
    from fastgrpo.trainer.routing_sft import routing_warmup_data
    from fastgrpo.trainer.sft import sft_sequences
    tok = T.build_routing_tokenizer(0)
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=1024)
    prompts, comps, masks = routing_warmup_data(tok, {}, online=False)
    sft_sequences(model, prompts, comps, loss_masks=masks, steps=25, batch_size=8, lr=1e-2, log=None)
    d = tmp_path_factory.mktemp("routing_model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


TINY = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "24",
        "--no-progress", "--no-plot", "--no-save", "--sample-every", "0", "--warmup-steps", "0"]


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_offline_builtin_trains(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    main(["--task", "routing", "--model", str(model_dir), "--out-dir", str(out), "--eval-size", "12", *TINY])
    s = _summary(out)
    for when in ("eval_before", "eval_after"):
        assert 0 <= s[when]["routing_accuracy"] <= 1 and 0 <= s[when]["answer_recall"] <= 1
    m = _metrics(out)
    assert len(m) == 2 and "rewards/step_type/mean" in m[0] and "routing_accuracy" in m[0]
    printed = capsys.readouterr().out
    assert "routing accuracy" in printed and "answer recall" in printed and "before Step-GRPO" in printed


def test_offline_user_jsonl(model_dir, tmp_path):
    rows = [{"prompt": "Origin question: Which city does Ann live in?", "step_type": "retrieve",
             "reference_query": "Which city does Ann live in?", "reference_kb": "text", "kbs": ["text", "table"]},
            {"prompt": "Question: Which city? Answer.", "step_type": "answer", "answer": "Velmora"}]
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    ev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    main(["--task", "routing", "--model", str(model_dir), "--train-file", str(train), "--eval-file", str(ev),
          "--out-dir", str(out), *TINY])
    s = _summary(out)
    assert s["eval_before"]["retrieve_rows"] == 1 and s["eval_before"]["answer_rows"] == 1


def test_online_builtin_trains(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    main(["--task", "routing", "--rollout-mode", "online", "--model", str(model_dir), "--out-dir", str(out),
          "--eval-size", "3", "--max-turns", "3", *TINY])
    s = _summary(out)
    assert set(s["eval_before"]) >= {"routing_accuracy", "answer_recall"}
    m = _metrics(out)
    assert len(m) == 2 and "rewards/retrieval_step/mean" in m[0]
    assert "multi-turn rollouts" in capsys.readouterr().out


def test_online_user_jsonl_and_kb_dir(model_dir, tmp_path):
    kb_dir = tmp_path / "kbs"
    T.build_kbs(T.make_world(0), kb_dir)
    train, _ = T.online_splits(0)
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "answer", "hops")}) + "\n" for r in train[:4]))
    out = tmp_path / "run"
    main(["--task", "routing", "--rollout-mode", "online", "--model", str(model_dir), "--train-file", str(f),
          "--eval-file", str(f), "--kb-dir", str(kb_dir), "--out-dir", str(out), "--max-turns", "2", *TINY])
    assert _summary(out)["eval_after"]["routing_accuracy"] is not None


@pytest.mark.parametrize("args, words", [
    (["--task", "maths"], "invalid --task 'maths'"),
    (["--rollout-mode", "online"], "invalid --rollout-mode 'online': multi-turn tool rollouts need --task routing"),
    (["--task", "routing", "--rollout-mode", "live"], "invalid --rollout-mode 'live'"),
    (["--task", "routing", "--max-turns", "0"], "invalid --max-turns 0"),
    (["--task", "routing", "--kb-dir", "/nonexistent/kbs"], "invalid --kb-dir '/nonexistent/kbs'"),
    (["--task", "routing", "--similarity-model", "/nonexistent/bge"], "invalid --similarity-model"),
])
def test_bad_options_exit_2(model_dir, tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        main([*args, "--model", str(model_dir), "--out-dir", str(tmp_path / "run"), *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err


@pytest.mark.parametrize("row, words", [
    ({"prompt": "p", "step_type": "search"}, "field 'step_type' must be one of retrieve, answer, got \"search\""),
    ({"prompt": "p", "step_type": "retrieve", "reference_kb": "text", "kbs": ["text"]}, "retrieve step needs 'reference_query'"),
    ({"prompt": "p", "step_type": "retrieve", "reference_query": "q", "reference_kb": "text"}, "retrieve step has no 'kbs'"),
    ({"prompt": "p", "step_type": "answer"}, "answer step needs 'answer'"),
])
def test_bad_step_rows_exit_2(model_dir, tmp_path, capsys, row, words):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--task", "routing", "--model", str(model_dir), "--train-file", str(f),
              "--out-dir", str(tmp_path / "run"), *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}:1: ") and words in err


def test_online_file_without_kb_dir_exit_2(model_dir, tmp_path, capsys):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--task", "routing", "--rollout-mode", "online", "--model", str(model_dir), "--train-file", str(f),
              "--out-dir", str(tmp_path / "run"), *TINY])
    assert e.value.code == 2 and "needs --kb-dir" in capsys.readouterr().err


def test_routing_sft_cli_tiny(tmp_path, capsys):
    from fastgrpo.trainer.sft import main as sft_main
    out = tmp_path / "warm"
    sft_main(["--task", "routing", "--out", str(out), "--steps", "2", "--batch-size", "4", "--hidden-size", "16",
              "--layers", "1", "--heads", "2", "--eval-size", "0"])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["sft_steps"] == 2 and result["train_sequences"] > 700


def test_sft_bad_task_exit_2(tmp_path, capsys):
    from fastgrpo.trainer.sft import main as sft_main
    with pytest.raises(SystemExit) as e:
        sft_main(["--task", "maths", "--out", str(tmp_path)])
    assert e.value.code == 2 and "error: invalid --task 'maths'" in capsys.readouterr().err


def test_default_model_is_the_shipped_warmup(tmp_path):
    from fastgrpo.tasks.routing import ROUTING_WARMUP_DIR
    assert (ROUTING_WARMUP_DIR / "model.safetensors").stat().st_size < 4_000_000  # a few MB at most
    out = tmp_path / "run"
    main(["--task", "routing", "--out-dir", str(out), "--eval-size", "10", *TINY[:2], "--prompts-per-step", "1",
          *TINY[4:], "--max-new-tokens", "40"])
    s = _summary(out)
    assert s["eval_before"]["routing_accuracy"] >= 0.5  # the warm-up routes (the first 10 eval step states)
    cfg = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert cfg["step"] == 1
