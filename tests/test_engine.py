import math

import pytest
import torch

from sslcli.errors import TrainingError

from sslcli.config import DINOConfig, ModelConfig
from sslcli.methods.base import StepOutput
from sslcli.methods.dino import DINO
from sslcli.train.engine import DivergenceGuard


def test_dino_health_flags_both_collapse_modes():
    """DINO's own collapse checks (thresholds live with the method, not the engine)."""
    k, d = 1000, 384
    model = ModelConfig(drop_path_rate=0.0, kwargs=dict(img_size=16, patch_size=8, embed_dim=d, depth=1, num_heads=6))
    method = DINO(model, DINOConfig(out_dim=k, hidden_dim=16, bottleneck_dim=8), epochs=1, steps_per_epoch=1)

    healthy = {"teacher_entropy": 3.0, "teacher_marginal_entropy": 6.0, "kl": 0.5, "embed_std": 1 / math.sqrt(d)}
    assert method.health(healthy) == []
    sharp = {"teacher_entropy": 0.01, "teacher_marginal_entropy": 4.0, "kl": 1e-4, "embed_std": 0.05}
    assert method.health(sharp) == []  # one-hot per image but spread over prototypes: healthy
    uniform = {"teacher_entropy": 0.99 * math.log(k), "kl": 1e-5, "embed_std": 0.05}
    assert [kind for kind, _ in method.health(uniform)] == ["uniform"]
    onehot = {"teacher_entropy": 0.01, "teacher_marginal_entropy": 0.02, "kl": 1e-4, "embed_std": 0.05}
    assert [kind for kind, _ in method.health(onehot)] == ["onehot"]
    dead = {"teacher_entropy": 3.0, "kl": 0.5, "embed_std": 1e-4}
    assert [kind for kind, _ in method.health(dead)] == ["std"]


def test_divergence_guard_remembers_the_first_bad_step_and_term():
    guard = DivergenceGuard(torch.device("cpu"))
    ok = StepOutput(torch.tensor(1.0), {"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    bad = StepOutput(torch.tensor(float("nan")), {"a": torch.tensor(1.0), "b": torch.tensor(float("inf"))})
    guard.observe(0, ok)
    guard.check(None)  # nothing to report
    guard.observe(1, bad)
    guard.observe(2, StepOutput(torch.tensor(float("nan")), {"a": torch.tensor(float("nan")), "b": torch.tensor(0.0)}))
    with pytest.raises(TrainingError, match=r"non-finite b at step 2; stopped \(no checkpoint was written yet\)"):
        guard.check(None)


def test_cpu_threads_leave_cores_to_the_data_workers(monkeypatch):
    import torch

    from sslcli.train.distributed import DistEnv, set_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    cpu = torch.device("cpu")
    try:
        assert set_cpu_threads(DistEnv(0, 1, 0, cpu), workers=2) == 6
        assert torch.get_num_threads() == 6
        assert set_cpu_threads(DistEnv(0, 2, 0, cpu), workers=1) == 3  # 8 cores shared by 2 processes
        assert set_cpu_threads(DistEnv(0, 1, 0, cpu), workers=10) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
        torch.set_num_threads(2)
        assert set_cpu_threads(DistEnv(0, 1, 0, cpu), workers=1) == 2  # the user's choice wins
    finally:
        torch.set_num_threads(before)
