"""The control-prefix evaluation (issue 12): what it measures is what it says it measures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from core.engine.data import IGNORE, Example
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.prefix import batch_prefixes, forward_with_prefixes
from core.engine.sampling import SamplingParams
from core.evaluation import datasets
from core.evaluation.controls import (
    LENGTH,
    REGISTER,
    ControlCorpus,
    ControlEvalSpec,
    WordRegisterClassifier,
    check_disjoint,
    composed_prefixes,
    generate_answers,
    held_out_rows,
    perplexities,
    run_control_evaluation,
    score_matrix,
    screenplay_chunks,
    summarize,
)
from core.evaluation.metrics import PrefixScorer
from tests.engine_fixtures import tiny  # noqa: F401 - fixture

TEXTS = [
    "The harvest was good this year and the granaries are full.",
    "We met the envoys at noon; they brought letters from the coast and asked for an answer.",
    "Nothing was said about the road, though everyone had an opinion of it by evening.",
]


def _kv(base, length: int, seed: int) -> torch.Tensor:
    g = base.geometry
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(g.num_layers, 2, g.num_kv_heads, length, g.head_dim, generator=generator)


def _manual_ppl(base, rows: list[Example], kv: torch.Tensor) -> float:
    """Perplexity of `rows`, one at a time, under one plain KV: the engine's forward, our own loss."""
    total, count = 0.0, 0
    for ex in rows:
        ids = torch.tensor([ex.input_ids])
        cache = batch_prefixes([kv], base.geometry, device=base.device, dtype=base.dtype)
        logits = forward_with_prefixes(base, ids, torch.ones_like(ids), cache).logits[0, :-1]
        targets = torch.tensor(ex.labels[1:])
        scored = targets != IGNORE
        total += float(F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum"))
        count += int(scored.sum())
    return math.exp(total / count)


def test_a_composed_row_is_scored_as_one_prefix_of_the_concatenated_kvs(tiny):  # noqa: F811
    user, control = _kv(tiny, 5, 1), _kv(tiny, 3, 2)
    rows = held_out_rows(tiny, TEXTS, 64)
    prefixes = composed_prefixes({"u": user}, {"alone": {"c": control}})
    found = perplexities(PrefixScorer(tiny, prefixes), {"composed": (rows, "u+alone/c"), "user": (rows, "u")})
    assert found["composed"] == pytest.approx(_manual_ppl(tiny, rows, torch.cat([user, control], dim=3)), rel=1e-4)
    assert found["user"] == pytest.approx(_manual_ppl(tiny, rows, user), rel=1e-4)
    assert found["composed"] != pytest.approx(found["user"], rel=1e-4)  # the control takes part


def test_matrix_cells_are_quotients_of_the_perplexities_they_report(tiny):  # noqa: F811
    users = {"ann": _kv(tiny, 4, 1), "bob": _kv(tiny, 4, 2)}
    controls = {"alone": {"brief": _kv(tiny, 4, 3)}, "beside": {"brief": _kv(tiny, 4, 4)}}
    scorer = PrefixScorer(tiny, composed_prefixes(users, controls))
    own = {"ann": held_out_rows(tiny, TEXTS[:1], 64), "bob": held_out_rows(tiny, TEXTS[1:2], 64)}
    attribute = {"brief": held_out_rows(tiny, TEXTS[2:], 64)}
    scored = score_matrix(scorer, own, attribute, ["alone", "beside"])

    assert set(scored["matrix"]) == {"alone", "beside"}
    for recipe, per_user in scored["matrix"].items():
        assert set(per_user) == {"ann", "bob"}
        for u, row in per_user.items():
            cell = row["brief"]
            composed = torch.cat([users[u], controls[recipe]["brief"]], dim=3)
            assert cell["attribute_ppl_uc"] == pytest.approx(_manual_ppl(tiny, attribute["brief"], composed), rel=1e-4)
            assert cell["own_ppl_uc"] == pytest.approx(_manual_ppl(tiny, own[u], composed), rel=1e-4)
            assert cell["own_ppl_u"] == pytest.approx(_manual_ppl(tiny, own[u], users[u]), rel=1e-4)
            assert cell["attribute_ratio"] == pytest.approx(cell["attribute_ppl_uc"] / cell["attribute_ppl_u"])
            assert cell["own_ratio"] == pytest.approx(cell["own_ppl_uc"] / cell["own_ppl_u"])


def test_answers_under_a_composition_are_those_of_the_concatenated_prefix(tiny):  # noqa: F811
    user, control = _kv(tiny, 4, 1), _kv(tiny, 2, 2)
    prefixes = composed_prefixes({"u": user}, {"alone": {"c": control}})
    spec = ControlEvalSpec(prompts=2, max_tokens=6, temperature=1.0, seed=3)
    generated = generate_answers(tiny, prefixes, ["u", "u+alone/c"], spec)
    for i, prompt in enumerate(generated["prompt_ids"]):
        params = SamplingParams(6, temperature=1.0, seed=3000 + i)
        request = GenerationRequest(prompt, params, torch.cat([user, control], dim=3))
        expected = MixedBatchGenerator(tiny).generate([request])[0]
        assert generated["answers"]["u+alone/c"][i]["token_ids"] == expected.token_ids


def test_summary_counts_each_goal_and_splits_served_from_unseen_users():
    def cell(attribute_ratio, own_ratio):
        return {"attribute_ratio": attribute_ratio, "own_ratio": own_ratio}

    matrix = {
        "alone": {
            "ann": {"brief": cell(0.9, 1.01), "long": cell(1.1, 1.2)},
            "zed": {"brief": cell(0.8, 1.06), "long": cell(0.95, 0.99)},
        }
    }
    generated = {"alone": {"ann": {"brief": {"moved": True}, "long": {"moved": True}}, "zed": {"brief": {}}}}
    summary = summarize(matrix, generated, unseen=["zed"])
    overall = summary["alone"]
    assert (overall["cells"], overall["attribute_helps"], overall["own_within_5pct"]) == (4, 3, 2)
    assert (overall["generated_moved"], overall["all_three"]) == (2, 1)
    assert overall["worst_own_ratio"] == 1.2
    assert summary["alone:served"]["cells"] == summary["alone:unseen"]["cells"] == 2
    assert summary["alone:unseen"]["attribute_helps"] == 2


def test_word_classifier_picks_the_register_whose_words_a_text_uses():
    classifier = WordRegisterClassifier(
        {"address": ["the congress and the treasury of the union"], "dialogue": ["hey barry what are you doing"]}
    )
    assert classifier.predict("The treasury reported to congress") == "address"
    assert classifier.predict("Barry, what are you doing?") == "dialogue"
    assert classifier.predict("...") is None


def test_screenplay_chunks_end_at_sentences_and_drop_page_headers():
    text = "BARRY Hello there. Bee Movie - JS REVISIONS 8/13/07 12. " + "It flies anyway. " * 30
    chunks = screenplay_chunks(text, words=10)
    assert all(c.endswith(".") for c in chunks)
    assert not any("REVISIONS" in c for c in chunks)
    assert all(len(c.split()) >= 10 for c in chunks)


def test_a_text_shared_by_a_user_and_a_control_is_refused():
    users = {"ann": datasets.UserTexts("ann", [TEXTS[0]], [TEXTS[1]])}
    clean = [ControlCorpus("brief", LENGTH, "test", [TEXTS[2]], [])]
    check_disjoint(users, clean)
    with pytest.raises(ValueError, match="both"):
        check_disjoint(users, [ControlCorpus("brief", LENGTH, "test", [" ".join(TEXTS[1].split())], [])])


def test_a_run_fills_every_recipe_user_and_control_and_writes_its_report(tiny, tmp_path):  # noqa: F811
    users = {
        name: datasets.UserTexts(name, [f"{name} says: {t}" for t in TEXTS * 2], [f"{name} adds: {TEXTS[0]}"])
        for name in ("ann", "bob", "cid")
    }
    controls = [
        ControlCorpus("brief", LENGTH, "test", ["Short.", "Very short.", "Brief one.", "Done now."], ["Quick."]),
        ControlCorpus("address", REGISTER, "test", [f"The Union: {t}" for t in TEXTS * 2], [TEXTS[2] + " Union."]),
        ControlCorpus("dialogue", REGISTER, "test", [f"BARRY {t}" for t in TEXTS * 2], ["BARRY Hi. ADAM Hey."]),
    ]
    spec = ControlEvalSpec(
        users=["ann", "bob"],
        unseen_users=["cid"],
        controls=["brief", "address", "dialogue"],
        user_steps=1,
        control_steps=1,
        eval_every=1,
        prompts=2,
        max_tokens=4,
        max_seq_len=64,  # room for a derived request's chat prompt (~42 tokens on the tiny model) and an answer
        base_model="tiny",
        out=str(tmp_path / "out"),
    )
    results = run_control_evaluation(spec, tiny, users=users, controls=controls, log=lambda _: None)

    assert set(results["matrix"]) == {"alone", "beside"}
    for per_user in results["matrix"].values():
        assert set(per_user) == {"ann", "bob", "cid"}
        for row in per_user.values():
            assert set(row) == {"brief", "address", "dialogue"}
            assert "tokens_per_answer" in row["brief"]["generated"]["uc"]
            assert "share_by_words" in row["dialogue"]["generated"]["uc"]
    assert set(results["summary"]) == {f"{r}{s}" for r in ("alone", "beside") for s in ("", ":served", ":unseen")}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert "## Matrix: recipe beside" in (tmp_path / "out" / "report.md").read_text()
