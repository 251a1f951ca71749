"""``python -m fastgrpo.experiments ablation``: arms, seeds, resumability, the summary table."""

from __future__ import annotations

import json
import math

import pytest

from fastgrpo.experiments import ARMS, main

TINY = ["--", "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--eval-size", "4",
        "--max-new-tokens", "16", "--no-plot", "--threads", "1"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    main(["ablation", "--seeds", "2", "--arms", "warmup,outcome,stepgrpo", "--out-dir", str(out), *TINY])
    return out


def _summary(out, arm, seed):
    return json.loads((out / arm / f"seed-{seed}" / "summary.json").read_text())


def test_each_arm_trains_with_its_own_reward_set(experiment):
    for arm in ("outcome", "stepgrpo"):
        for seed in (0, 1):
            m = json.loads((experiment / arm / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()[0])
            assert ("rewards/step_rar/mean" in m) == ("step_rar" in ARMS[arm])
            assert "rewards/accuracy/mean" in m
    assert not (experiment / "warmup").exists()  # the warm-up arm trains nothing


def test_table_is_mean_and_standard_error_of_the_runs(experiment):
    result = json.loads((experiment / "ablation.json").read_text())
    for arm in ("outcome", "stepgrpo"):
        xs = [_summary(experiment, arm, s)["eval_after"]["accuracy"] for s in (0, 1)]
        row = result["arms"][arm]
        assert row["accuracy"] == xs
        assert row["mean"] == pytest.approx((xs[0] + xs[1]) / 2)
        assert row["se"] == pytest.approx(abs(xs[0] - xs[1]) / 2)  # s/sqrt(2), s = |a-b|/sqrt(2)
    d = [a - b for a, b in zip(result["arms"]["stepgrpo"]["accuracy"], result["arms"]["outcome"]["accuracy"])]
    assert result["arms"]["stepgrpo"]["diff_vs_outcome"] == pytest.approx(sum(d) / 2)
    # unpaired: sqrt(se_stepgrpo^2 + se_outcome^2), by hand from the four accuracies
    se = {a: abs(result["arms"][a]["accuracy"][0] - result["arms"][a]["accuracy"][1]) / 2
          for a in ("stepgrpo", "outcome")}
    assert result["arms"]["stepgrpo"]["unpaired_se"] == pytest.approx(math.sqrt(se["stepgrpo"] ** 2 + se["outcome"] ** 2))
    for arm in ("outcome", "stepgrpo"):  # the greedy completions' validity, per seed
        vs = [_summary(experiment, arm, s)["eval_after"]["validity"] for s in (0, 1)]
        assert result["arms"][arm]["validity"] == vs
        assert result["arms"][arm]["validity_mean"] == pytest.approx(sum(vs) / 2)
    assert result["arms"]["warmup"]["validity"] == [_summary(experiment, "outcome", s)["eval_before"]["validity"]
                                                    for s in (0, 1)]
    before = _summary(experiment, "outcome", 0)["eval_before"]["accuracy"]
    assert result["arms"]["warmup"]["mean"] == pytest.approx(before)
    table = (experiment / "ablation.md").read_text()
    assert "| stepgrpo | step_rar,step_rvr |" in table and "| outcome | accuracy |" in table
    assert (experiment / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in result["arms"]["outcome"].values())


def test_a_killed_experiment_continues(experiment, capsys):
    done = experiment / "outcome" / "seed-0" / "summary.json"
    stamp = (experiment / "stepgrpo" / "seed-1" / "summary.json").stat().st_mtime_ns
    done.unlink()
    main(["ablation", "--seeds", "2", "--arms", "warmup,outcome,stepgrpo", "--out-dir",
          str(experiment), *TINY])
    err = capsys.readouterr().err
    assert "outcome seed 0: training" in err
    assert "stepgrpo seed 1: done already" in err
    assert done.is_file()
    assert (experiment / "stepgrpo" / "seed-1" / "summary.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("argv, message", [
    (["ablation", "--arms", "outcome,ppo"], "unknown arm(s) ppo"),
    (["ablation", "--seeds", "0"], "--seeds must be >= 1"),
    (["ablation", "--shard", "2/2"], "--shard must be I/K"),
])
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_shards_split_the_runs(tmp_path, capsys):
    argv = ["ablation", "--seeds", "1", "--arms", "outcome,stepgrpo", "--out-dir", str(tmp_path)]
    main([*argv, "--shard", "1/2", *TINY])
    assert "other shards still running" in capsys.readouterr().err
    assert (tmp_path / "stepgrpo" / "seed-0" / "summary.json").is_file()
    assert not (tmp_path / "outcome").exists() and not (tmp_path / "ablation.md").exists()
    main([*argv, "--shard", "0/2", *TINY])
    assert (tmp_path / "ablation.md").is_file()


def test_report_without_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["ablation", "--report", "--seeds", "1", "--arms", "outcome", "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "run the ablation without --report first" in capsys.readouterr().err
