"""Admin retraining: pick users, then train them in batched multi-user jobs.

One admin-batch job trains up to `users_per_job` users sharing every forward pass (see
`core.tuners.loop`), so retraining everyone after a base model upgrade costs ~N/8 jobs, not N.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from core.db import Job, PrefixVersion, Sample, User
from core.service.errors import InvalidInput, NotFound
from core.service.hyperparameters import validate_hyperparameters
from core.service.jobs import create_job
from core.service.users import could_be_user_id

DEFAULT_USERS_PER_JOB = 8
MAX_USERS_PER_JOB = 64


@dataclass
class RetrainSelection:
    """Which users to retrain. Exactly one of `user_ids` / `all_users` / a filter is used;
    the two filters may be combined (users matching either)."""

    user_ids: list[str] | None = None
    all_users: bool = False
    trained_before: datetime | None = None
    other_base_fingerprint: str | None = None
    """Select users whose active prefix was trained on a base model with another fingerprint."""


def select_users(session: Session, selection: RetrainSelection) -> list[User]:
    """Live users with samples matching `selection`, ordered by creation."""
    modes = sum(
        [
            selection.user_ids is not None,
            selection.all_users,
            selection.trained_before is not None or selection.other_base_fingerprint is not None,
        ]
    )
    if modes != 1:
        raise InvalidInput(
            "choose exactly one of: user_ids, all, or the filters trained_before / other_base_model",
            param="user_ids",
        )
    has_samples = exists().where(Sample.user_id == User.id)
    # Controls retrain through their own route (they train beside users, without preservation).
    statement = select(User).where(User.deleted_at.is_(None), User.kind == "user", has_samples)
    if selection.user_ids is not None:
        if not selection.user_ids:
            raise InvalidInput("user_ids is empty", param="user_ids")
        wellformed = [uid for uid in selection.user_ids if could_be_user_id(uid)]
        users = {u.id: u for u in session.execute(select(User).where(User.id.in_(wellformed))).scalars()}
        missing = [
            uid
            for uid in selection.user_ids
            if uid not in users or users[uid].deleted_at is not None or users[uid].kind != "user"
        ]
        if missing:
            shown = [uid for uid in missing if could_be_user_id(uid)][:10]  # never echo arbitrary text
            raise NotFound(f"{len(missing)} unknown user id(s): {', '.join(shown) or 'not user ids'}")
        statement = statement.where(User.id.in_(selection.user_ids))
    elif not selection.all_users:
        active = (PrefixVersion.user_id == User.id) & (PrefixVersion.status == "active")
        conditions = []
        if selection.trained_before is not None:
            if selection.trained_before.tzinfo is None:
                raise InvalidInput("trained_before needs a time zone (e.g. ...Z)", param="trained_before")
            conditions.append(exists().where(active, PrefixVersion.created_at < selection.trained_before))
        if selection.other_base_fingerprint is not None:
            conditions.append(
                exists().where(active, PrefixVersion.base_fingerprint != selection.other_base_fingerprint)
            )
        statement = statement.where(or_(*conditions))
    return list(session.execute(statement.order_by(User.created_at, User.id)).scalars())


def create_retrain_jobs(
    session: Session,
    selection: RetrainSelection,
    hyperparameters: object,
    users_per_job: int = DEFAULT_USERS_PER_JOB,
) -> list[Job]:
    """Queued admin-batch jobs covering the selected users (none if nobody matches)."""
    validate_hyperparameters(hyperparameters)
    if not 1 <= users_per_job <= MAX_USERS_PER_JOB:
        raise InvalidInput(f"users_per_job must be in [1, {MAX_USERS_PER_JOB}]", param="users_per_job")
    users = select_users(session, selection)
    return [
        create_job(session, "admin-batch", users[start : start + users_per_job], hyperparameters)
        for start in range(0, len(users), users_per_job)
    ]
