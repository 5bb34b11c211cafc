"""What a request carries to the engine arrives whole over Redis: every sampling parameter."""

import json

from core.engine.sampling import SamplingParams
from core.inference.jobs import InferenceJob


def test_a_job_keeps_every_sampling_parameter_through_json_and_per_row():
    params = SamplingParams(9, 0.7, 0.9, ["\n\n"], 41, frequency_penalty=1.25, presence_penalty=-0.5)
    job = InferenceJob([1, 2, 3], params, n=3)
    arrived = InferenceJob.from_dict(json.loads(json.dumps(job.to_dict())))
    assert arrived.params == params and arrived.prompt_ids == [1, 2, 3] and arrived.n == 3
    rows = [arrived.row_params(i) for i in range(3)]
    assert [r.seed for r in rows] == [41, 42, 43]  # the n choices differ, each reproducible
    assert {(r.frequency_penalty, r.presence_penalty, r.temperature, r.top_p) for r in rows} == {(1.25, -0.5, 0.7, 0.9)}
    rows[0].stop.append("x")
    assert arrived.params.stop == ["\n\n"]  # a row's parameters are its own copy
