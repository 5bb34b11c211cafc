"""Helpers for the completion API tests: a running service on a loopback port, users, prefixes."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import torch
import uvicorn

from core.engine.model import BaseModel
from core.service.api_keys import issue_user_key
from core.service.registry import PrefixArtifacts, publish_prefix
from core.service.users import get_or_create_user
from core.tuners.artifacts import Prefix, save_prefix

ADMIN_KEY = "sk-steer-admin-test-key-for-inference"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a background thread of this process."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class TestUser:
    external_id: str
    user_id: str
    key: str


def create_user(ctx, external_id: str) -> TestUser:
    with ctx.session_factory() as session:
        user, _ = get_or_create_user(session, external_id)
        key = issue_user_key(session, user)
        session.commit()
        return TestUser(external_id, user.id, key)


def random_prefix_bytes(base: BaseModel, seed: int, prefix_len: int = 4, scale: float = 3.0) -> bytes:
    """A random (but valid, bound to `base`) prefix artifact: enough to change the model's output."""
    g = base.geometry
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(g.num_layers, 2, g.num_kv_heads, prefix_len, g.head_dim, generator=generator) * scale
    return save_prefix(Prefix(kv=kv, base_model_id=base.model_id, base_fingerprint=base.fingerprint))


def publish_random_prefix(ctx, base: BaseModel, user: TestUser, seed: int, prefix_len: int = 4) -> int:
    """Publish a new active prefix version for `user`; returns its version number."""
    data = random_prefix_bytes(base, seed, prefix_len)
    artifacts = PrefixArtifacts(data, None, base.model_id, base.fingerprint, prefix_len, {})
    row = publish_prefix(ctx.session_factory, ctx.store, user.user_id, artifacts, job_id=None)
    return row.version


def build_app(ctx, completer=None):
    """The real service app (`api.app.create_app`) around `ctx`; `completer` replaces the mode's own."""
    from api.app import create_app

    app = create_app(context=ctx)
    if completer is not None:
        app.state.completer = completer
    return app
