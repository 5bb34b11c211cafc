"""The lanes of tests/conftest.py name real test modules: a renamed module must not leave a lane
quietly (the fast lane would shrink; a compute module would move to the service lane)."""

from pathlib import Path

from tests.conftest import COMPUTE_LANE, FAST_LANE

TEST_MODULES = {path.stem for path in Path(__file__).parent.glob("test_*.py")}


def test_every_module_a_lane_names_exists():
    assert FAST_LANE - TEST_MODULES == set()
    assert COMPUTE_LANE - TEST_MODULES == set()


def test_the_compute_lane_holds_the_default_model_end_to_end_and_the_engine_equivalence_tests():
    assert {"test_e2e_voice_task", "test_engine_generation", "test_engine_training"} <= COMPUTE_LANE
    assert len(TEST_MODULES - COMPUTE_LANE) > len(COMPUTE_LANE) / 2  # the service lane is not empty
