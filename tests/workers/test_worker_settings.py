"""A model worker's settings: what `corral worker` pins in the environment for its pool is
what the pool processes read back through Settings (workers.process)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from app.core.config import HeldReservation, Settings, settings_env
from app.scheduler.ledger import Reservation
from app.scheduler.placement import Placement
from workers import launch as worker
from workers.process import placement_from_settings
from workers.runtime import Placement as RuntimePlacement

PINNED = (
    "CUDA_VISIBLE_DEVICES",
    "CORRAL_N_GPU_LAYERS",
    "CORRAL_MAIN_GPU",
    "CORRAL_TENSOR_SPLIT",
    "CORRAL_RESERVATIONS",
    "CORRAL_WORKER_MODEL",
    "CORRAL_WORKER_CTX",
    "CORRAL_N_THREADS",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No worker variables set; whatever a test sets is undone afterwards."""
    for name in PINNED:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_place_the_model_on_the_cpu(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.worker_model is None and settings.reservations == ()
    assert placement_from_settings(settings) == RuntimePlacement()


def test_the_worker_variables_are_validated_settings(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CORRAL_WORKER_MODEL", "tiny-chat")
    clean_env.setenv("CORRAL_WORKER_CTX", "256")
    clean_env.setenv("CORRAL_N_GPU_LAYERS", "-1")
    clean_env.setenv("CORRAL_MAIN_GPU", "1")
    clean_env.setenv("CORRAL_TENSOR_SPLIT", "[3, 1.5]")
    clean_env.setenv("CORRAL_N_THREADS", "4")
    clean_env.setenv("CORRAL_RESERVATIONS", '[{"id": "r1", "host": "h", "gpu": 1}]')
    settings = Settings()
    assert (settings.worker_model, settings.worker_ctx) == ("tiny-chat", 256)
    assert settings.reservations == (HeldReservation(id="r1", host="h", gpu=1),)
    assert placement_from_settings(settings) == RuntimePlacement(
        n_gpu_layers=-1, main_gpu=1, tensor_split=[3.0, 1.5], n_threads=4
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CORRAL_N_GPU_LAYERS", "-2"),
        ("CORRAL_WORKER_CTX", "0"),
        ("CORRAL_TENSOR_SPLIT", '["a"]'),
        ("CORRAL_TENSOR_SPLIT", "1,1"),  # a list is JSON
        ("CORRAL_RESERVATIONS", '[{"id": "r1"}]'),
    ],
)
def test_a_bad_worker_variable_fails_validation(
    clean_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_what_corral_worker_pins_the_pool_reads_back(clean_env: pytest.MonkeyPatch) -> None:
    held = [
        Reservation(id=f"r{gpu}", host="h", gpu=gpu, model="m", holder="w", bytes=1)
        for gpu in (2, 3)
    ]
    worker._pin(Placement(reservations=held, split=(3, 1)))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    settings = Settings()
    assert settings.reservations == (
        HeldReservation(id="r2", host="h", gpu=2),
        HeldReservation(id="r3", host="h", gpu=3),
    )
    assert placement_from_settings(settings) == RuntimePlacement(
        n_gpu_layers=-1, main_gpu=0, tensor_split=[3.0, 1.0]
    )


def test_settings_env_reproduces_the_settings(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings(
        worker_model="tiny-chat",
        tensor_split=(1.0, 2.0),
        reservations=(HeldReservation(id="r1", host="h", gpu=0),),
        flash_attention=True,
        max_step_timeout_s=12.5,
    )
    for name, value in settings_env(settings).items():
        if name.startswith("CORRAL_"):
            clean_env.setenv(name, value)
    assert Settings() == settings
