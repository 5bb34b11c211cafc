"""`POST /v1/chat/completions/{id}/feedback`: what the user did with an answer (core/service/feedback.py)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CallerDep, DispatcherDep, SessionDep, SettingsDep
from api.jobs_dispatch import commit_and_dispatch
from api.openapi import BODY_ERRORS, errors
from api.responses import FeedbackRecorded
from api.schemas import FeedbackRequest, ts
from core.db import User
from core.service.feedback import record_feedback, retraining_due
from core.service.jobs import create_job
from core.service.quotas import RateLimited, check_job_quota

router = APIRouter(prefix="/chat/completions", tags=["feedback"])


@router.post("/{completion_id}/feedback", status_code=201, responses={**BODY_ERRORS, **errors(404, 409)})
def feedback(
    completion_id: str,
    body: FeedbackRequest,
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
) -> FeedbackRecorded:
    """Report what the user did with a chat completion of theirs (their own key, or the admin's).
    An accepted or edited answer becomes a writing sample; an edit (or what replaced a rejected
    answer) over the draft becomes a preference pair for DPO. 404 for an unknown, expired or other
    user's completion, 409 for feedback given twice, 400 for an empty or unchanged edit."""
    recorded = record_feedback(session, settings, caller, completion_id, body.kind, body.final_text, body.choice_index)
    row = recorded.feedback
    jobs = []
    hyperparameters = retraining_due(session, settings, row.user_id)
    if hyperparameters is not None:
        try:
            check_job_quota(session, settings, row.user_id, hyperparameters)
            jobs.append(create_job(session, "retrain", [session.get(User, row.user_id)], hyperparameters))
        except RateLimited:
            pass  # the user's jobs are at their quota: the next feedback tries again
    commit_and_dispatch(session, dispatcher, jobs)
    return FeedbackRecorded(
        id=row.id,
        completion_id=row.completion_id,
        choice_index=row.choice_index,
        kind=row.kind,
        samples_added=recorded.samples_added,
        pairs_added=recorded.pairs_added,
        job=jobs[0].id if jobs else None,
        created_at=ts(row.created_at),
    )
