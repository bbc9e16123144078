"""`algorithm: opd` end to end on tiny models: the trainer loads a frozen teacher on the student's mesh, the
teacher's scoring pass fills the top-k targets, the student trains on them, and the OPD metrics are logged."""

import json
import os

import numpy as np
import pytest

from mathgrpo.config import load_config
from mathgrpo.testing import demo_task
from mathgrpo.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_OPD = os.path.join(ROOT, "configs", "demo_cpu_opd.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("opd")
    paths = demo_task.build_task(directory, operand_limit=6, held_out=8)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    demo_task.build_model(directory / "student", paths["tokenizer"], seed=1, **small)
    demo_task.build_model(directory / "teacher", paths["tokenizer"], seed=2, **dict(small, num_hidden_layers=2))
    return paths, str(directory / "student"), str(directory / "teacher")


def overrides(models, output_dir, *extra, steps=2):
    paths, student, teacher = models
    return [f"model.path={student}", f"distill.teacher.path={teacher}", f"data.train_files=[{paths['train']}]",
            f"data.val_files=[{paths['val']}]", "data.train_batch_size=4", "rollout.n=4", "rollout.val_n=2",
            "optim.lr=1e-2", f"trainer.total_steps={steps}", "trainer.save_freq=2", "trainer.test_freq=2",
            "trainer.val_before_train=false", f"trainer.output_dir={output_dir}", *extra]


@pytest.mark.parametrize("extra", [(), ("distill.top_k=0",),
                                   ("distill.top_k_strategy=union", "distill.estimator=token_reward_direct_plus_grpo")],
                         ids=["recipe", "sampled-token", "union-plus-grpo"])
def test_opd_run_logs_distillation_metrics_and_moves_the_student(models, tmp_path, extra):
    output = tmp_path / "run"
    metrics = loop.train(load_config(DEMO_OPD, overrides(models, output, *extra)))
    for key in ("distill/teacher_logprob", "distill/student_logprob", "distill/reverse_kl",
                "distill/token_reward/mean", "critic/true_reward/mean", "actor/pg_loss", "actor/grad_norm",
                "timing_s/rm", "val-core/arith/acc/mean@2"):
        assert key in metrics, key
    assert not any(k.startswith("critic/score/") for k in metrics)  # the math reward is only logged
    if "distill.top_k=0" not in extra:
        assert 0.0 <= metrics["distill/overlap_ratio"] <= 1.0
    assert np.isfinite(metrics["actor/grad_norm"]) and metrics["actor/grad_norm"] > 0
    rows = [json.loads(line) for line in open(output / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2]
    # The teacher is frozen and not checkpointed: the checkpoint holds the student's train state only.
    assert sorted(os.listdir(output / "checkpoints")) == ["2"]


def test_opd_refuses_a_teacher_with_another_vocabulary(models, tmp_path):
    paths, student, _ = models
    other = tmp_path / "other"
    demo_task.build_model(other, paths["tokenizer"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          vocab_size=demo_task.vocab_size() + 8)
    with pytest.raises(ValueError, match="same vocabulary"):
        loop.train(load_config(DEMO_OPD, overrides(models, tmp_path / "run", f"distill.teacher.path={other}")))
