"""A running Steer seen from outside, for end-to-end tests: HTTP as the admin, the unchanged
`openai` client per key, and the engine run directly on stored versions (what a request should get
alone)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from openai import OpenAI

from core.db import PrefixVersion
from core.engine.adaptation import row_parts
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.prompts import chat_prompt_ids
from core.engine.sampling import SamplingParams
from core.inference.catalog import prefix_ref
from core.inference.prefix_cache import store_loader
from core.service.registry import active_prefix
from tests.support.api import ADMIN_KEY, tiny_base_model

JOB_TIMEOUT_S = 300
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
MAX_TOKENS = 12


class Running:
    """A running Steer: HTTP as the admin, `openai` clients per key, and the engine run directly on
    the stored versions (what a request should get when it runs alone)."""

    def __init__(self, base_url: str, ctx, worker_logs: list[Path] = ()) -> None:
        self.base_url, self.ctx, self.worker_logs = base_url, ctx, list(worker_logs)
        self.base = tiny_base_model()
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=120)

    def wait(self, job_id: str) -> dict:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self.http.get(f"/fine_tuning/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                assert job["status"] == "succeeded", (job, self._logs())
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not finish; {self._logs()}")

    def alone(self, subjects: list[str], with_lora: bool = True) -> str:
        """Greedy answer of the engine run directly on these subjects' active versions, composed."""
        with self.ctx.session_factory() as session:
            return self.alone_versions([active_prefix(session, subject) for subject in subjects], with_lora)

    def alone_versions(self, rows: list[PrefixVersion], with_lora: bool = True) -> str:
        """Greedy answer of the engine run directly on these stored versions, composed in order, with
        the loop guard the service gives greedy personalised rows (STEER_GREEDY_NO_REPEAT_NGRAM)."""
        parts = [store_loader(self.ctx.store, self.base)(prefix_ref(row)) for row in rows]
        prefix, lora = row_parts(parts)
        ids = chat_prompt_ids(self.base.tokenizer, MESSAGES)
        guard = self.ctx.settings.greedy_no_repeat_ngram if rows else 0
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, no_repeat_ngram=guard)
        request = GenerationRequest(ids, params, prefix, lora=lora if with_lora else None)
        return MixedBatchGenerator(self.base).generate([request])[0].text

    def _logs(self) -> str:
        return "\n".join(path.read_text()[-3000:] for path in self.worker_logs)


def chat(client: OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    return reply.choices[0].message.content
