"""What a user did with an answer, turned into training data.

Where the deployment opts in (`STEER_FEEDBACK_ENABLED`), each chat completion on a user's model is
kept, request and answers, for `STEER_FEEDBACK_RETENTION_DAYS`. The application then reports what
its user did with one choice of it:

    accepted   sent as it was          -> a sample (the answer is now the user's own text)
    edited     sent their edit of it   -> a sample (the edit) and a pair: edit over draft
    rejected   threw it away           -> with `final_text` (what they wrote instead): a sample and
                                          a pair, final over draft; without, nothing to train on
                                          (kept as feedback, counted)

A sample trains the next supervised job; a pair the next DPO job. With
`STEER_FEEDBACK_RETRAIN_AFTER` = K > 0, the K-th new feedback item since the user's last job queues
one for them (through the same quotas as any job): DPO when they have pairs, else supervised.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import User, utcnow
from core.db.models import FEEDBACK_KINDS, Feedback, Job, StoredCompletion
from core.engine.data import clean_text
from core.service.api_keys import Caller
from core.service.errors import Conflict, InvalidInput, NotFound
from core.service.hyperparameters import OBJECTIVE
from core.service.jobs import members_of_jobs_in_flight
from core.service.preferences import count_pairs, store_pairs
from core.service.samples import add_samples, validate_samples
from core.tuners.preference import OBJECTIVE_DPO, OBJECTIVE_SFT, PreferencePair

SOURCE = "feedback"
ACCEPTED, EDITED, REJECTED = FEEDBACK_KINDS


def remember_completion(
    session: Session,
    settings: Settings,
    completion_id: str,
    user_id: str,
    model: str,
    messages: list[dict[str, str]],
    answers: list[str],
) -> None:
    """Keep a user's chat completion for feedback (nothing where the deployment has not opted in);
    completions past their retention go at the same time."""
    if not settings.feedback_enabled:
        return
    now = utcnow()
    session.execute(delete(StoredCompletion).where(StoredCompletion.expires_at < now))
    expires_at = now + timedelta(days=settings.feedback_retention_days)
    session.add(
        StoredCompletion(
            id=completion_id, user_id=user_id, model=model, messages=messages, answers=answers, expires_at=expires_at
        )
    )


def subject_user(session: Session, user_ids: list[str]) -> str | None:
    """The user (not a control, not the population) among a request's prefixes' owners."""
    query = select(User.id).where(User.id.in_(user_ids), User.kind == "user", User.deleted_at.is_(None))
    return session.execute(query.limit(1)).scalar()


@dataclass
class Recorded:
    feedback: Feedback
    samples_added: int
    pairs_added: int


def record_feedback(
    session: Session,
    settings: Settings,
    caller: Caller,
    completion_id: str,
    kind: object,
    final_text: object = None,
    choice_index: object = 0,
) -> Recorded:
    """Record what the user did with choice `choice_index` of completion `completion_id`, and the
    sample and pair it becomes. Bad input raises before anything is written."""
    completion = _visible_completion(session, caller, completion_id)
    if kind not in FEEDBACK_KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(FEEDBACK_KINDS)}", param="kind")
    if isinstance(choice_index, bool) or not isinstance(choice_index, int):
        raise InvalidInput("choice_index must be an integer", param="choice_index")
    if not 0 <= choice_index < len(completion.answers):
        raise InvalidInput(f"choice_index must be in [0, {len(completion.answers) - 1}]", param="choice_index")
    draft = completion.answers[choice_index]
    final = _final_text(kind, final_text, draft, settings)
    if session.execute(
        select(Feedback.id).where(Feedback.completion_id == completion.id, Feedback.choice_index == choice_index)
    ).first():
        raise Conflict(f"feedback on choice {choice_index} of {completion.id} was already given")
    user = session.get(User, completion.user_id)
    if kind == ACCEPTED:
        (text,) = validate_samples([draft], settings, param="kind")  # an empty answer is nothing to accept
    else:
        text = final
    samples = add_samples(session, settings, user, [text], source=SOURCE)[0] if text is not None else []
    pairs = []
    if final is not None:  # edited, or rejected with what they wrote instead
        pair = PreferencePair(tuple(dict(m) for m in completion.messages), final, clean_text(draft))
        pairs = store_pairs(session, completion.user_id, [pair], source=SOURCE)
    row = Feedback(
        completion_id=completion.id,
        user_id=completion.user_id,
        choice_index=choice_index,
        kind=kind,
        final_text=final,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # the same feedback, reported twice at once
        raise Conflict(f"feedback on choice {choice_index} of {completion.id} was already given") from None
    return Recorded(row, len(samples), len(pairs))


def _visible_completion(session: Session, caller: Caller, completion_id: str) -> StoredCompletion:
    """A stored, unexpired completion of a user the caller may act for; NotFound for anything else
    (another user's completion is as unknown as a made-up id)."""
    completion = session.get(StoredCompletion, completion_id) if isinstance(completion_id, str) else None
    if completion is None or completion.expires_at < utcnow() or not caller.may_access(completion.user_id):
        raise NotFound(
            f"no stored completion {completion_id!r} (feedback is taken on a user's own chat completions "
            "while they are kept: STEER_FEEDBACK_ENABLED, STEER_FEEDBACK_RETENTION_DAYS)"
        )
    return completion


def _final_text(kind: str, final_text: object, draft: str, settings: Settings) -> str | None:
    if kind == ACCEPTED:
        if final_text is not None:
            raise InvalidInput("an accepted answer has no final_text; report an edit as kind 'edited'", "final_text")
        return None
    if final_text is None:
        if kind == EDITED:
            raise InvalidInput("an edited answer needs its final_text", param="final_text")
        return None
    (final,) = validate_samples([final_text], settings, param="final_text")
    if final == clean_text(draft):
        raise InvalidInput("final_text equals the answer; report it as kind 'accepted'", param="final_text")
    return final


def feedback_since_last_job(session: Session, user_id: str) -> int:
    """The user's feedback items since their newest job was created (all of them if none)."""
    last = session.execute(select(func.max(Job.created_at)).where(Job.trains(user_id))).scalar()
    query = select(func.count()).select_from(Feedback).where(Feedback.user_id == user_id)
    if last is not None:
        query = query.where(Feedback.created_at > last)
    return session.execute(query).scalar_one()


def retraining_due(session: Session, settings: Settings, user_id: str) -> dict | None:
    """The hyperparameters of the job the loop closes with, when `STEER_FEEDBACK_RETRAIN_AFTER`
    new feedback items have come in since the user's newest job and none of theirs is in flight;
    else None. DPO when the user has preference pairs, supervised otherwise."""
    every = settings.feedback_retrain_after
    if every <= 0 or feedback_since_last_job(session, user_id) < every:
        return None
    if members_of_jobs_in_flight(session, user_id):
        return None
    return {OBJECTIVE: OBJECTIVE_DPO if count_pairs(session, user_id) else OBJECTIVE_SFT}
