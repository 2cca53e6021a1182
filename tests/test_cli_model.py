"""The offline model commands: train --data, eval --json, score; errors and exit codes."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from palate.cli.training import eval_command, score_command, train_command  # noqa: E402
from tiny_lm import marker_pairs, save_tiny_model_dir  # noqa: E402


def _write(path: Path, rows: list[dict]) -> str:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("cli")
    base = save_tiny_model_dir(tmp / "base")
    rows = [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in marker_pairs(160)
    ]
    rows += [
        {"prompt": "w1 w2", "response": "zz w3", "label": 1},
        {"prompt": "w4", "response": "w5", "label": -1},
    ]
    train = _write(tmp / "train.jsonl", rows)
    test = _write(
        tmp / "test.jsonl",
        [
            {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            for p in marker_pairs(60, seed=5)
        ],
    )
    out = tmp / "model"
    res = CliRunner().invoke(
        train_command,
        [
            "--data",
            train,
            "--output",
            str(out),
            "--base-model",
            base,
            "--layers",
            "2",
            "--epochs",
            "3",
            "--lr",
            "3e-3",
            "--max-tokens",
            "64",
            "--batch-tokens",
            "1024",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    return tmp, out, test, json.loads(res.output)


def test_train_writes_self_describing_dir(setup) -> None:  # type: ignore[no-untyped-def]
    _, out, _, report = setup
    cfg = json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file()
    assert cfg["training_data"]["ratings"] == 2 and cfg["lora"]["layers"] == 2
    assert report["metrics"]["steps"] > 0


def test_eval_json_contract(setup) -> None:  # type: ignore[no-untyped-def]
    _, out, test, _ = setup
    res = CliRunner().invoke(eval_command, ["--model", str(out), "--data", test, "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    for key in ("accuracy", "n", "baseline_shorter", "baseline_longer", "ci_low", "ci_high"):
        assert key in rep
    assert rep["n"] == 60 and rep["accuracy"] >= 0.9
    # The ensemble's view (issue 16): members, calibration, accuracy on the surest pairs.
    assert rep["members"] == 5 and 0.0 <= rep["ece"] <= 1.0
    curve = rep["coverage_accuracy"]
    assert [c for c, _ in curve] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert curve[-1][1] == pytest.approx(rep["accuracy"])
    assert rep["selective_accuracy_50"] == curve[4][1] >= rep["accuracy"] - 1e-9
    # The length effect (issue 15): the subsets partition the unequal-length pairs and the
    # controlled accuracy is their mean.
    n_l, n_s = rep["n_chosen_longer"], rep["n_chosen_shorter"]
    assert n_l > 0 and n_s > 0 and n_l + n_s <= rep["n"]
    assert rep["length_controlled_accuracy"] == pytest.approx(
        (rep["accuracy_chosen_longer"] + rep["accuracy_chosen_shorter"]) / 2
    )
    assert -1.0 <= rep["length_corr"] <= 1.0


def test_score_human_and_json(setup) -> None:  # type: ignore[no-untyped-def]
    _, out, _, _ = setup
    runner = CliRunner()
    res = runner.invoke(score_command, ["--model", str(out), "w1 w2", "w3 zz", "w4 w5", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["best"] == 0 and len(data["scores"]) == 2
    res = runner.invoke(score_command, ["--model", str(out), "w1 w2", "w3 zz", "w4 w5"])
    assert res.exit_code == 0 and "z=" in res.output
    # each score line names the response it belongs to
    lines = res.output.splitlines()
    assert "[0]" in lines[0] and lines[0].endswith("'w3 zz'")
    assert "[1]" in lines[1] and lines[1].endswith("'w4 w5'")
    res = runner.invoke(score_command, ["--model", str(out), "  ", "w3 zz"])
    assert res.exit_code == 2 and "must not be empty or blank" in res.output


def test_bad_input_one_line_errors(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, out, _, _ = setup
    runner = CliRunner()
    res = runner.invoke(eval_command, ["--model", str(out), "--data", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 2 and "no such file" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
    res = runner.invoke(train_command, ["--data", str(bad), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "bad.jsonl:2: invalid JSON" in res.output
    res = runner.invoke(score_command, ["--model", str(tmp_path), "p", "r"])
    assert res.exit_code == 1 and "not a Palate model directory" in res.output
    res = runner.invoke(train_command, ["--data", str(bad), "--output", str(out)])
    assert res.exit_code == 2


def test_help_everywhere() -> None:
    for cmd in (train_command, eval_command, score_command):
        res = CliRunner().invoke(cmd, ["--help"])
        assert res.exit_code == 0 and "Usage" in res.output
