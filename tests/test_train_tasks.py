"""Training tasks: classification losses (label smoothing, Mixup/CutMix soft targets) and DeiT distillation
(facebookresearch/deit losses.py), checked against losses written out by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit.data import MixupCutmix
from vitkit.train.tasks import ClassifyTask, DistillTask, TeacherInput, distillation_loss

K = 5


def tiny(name="vit_tiny_patch16_224", **kw):
    return vitkit.create_model(name, img_size=16, patch_size=4, depth=1, embed_dim=24, num_heads=2,
                               num_classes=K, **kw)


def randomize_heads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for h in model.classifiers():
            h.weight.copy_(torch.randn(h.weight.shape, generator=g))
    return model


def test_soft_distillation_is_tau_squared_kl_over_numel():
    g = torch.Generator().manual_seed(0)
    s, t, tau = torch.randn(4, K, generator=g), torch.randn(4, K, generator=g), 3.0
    p_t, log_p_s = (t / tau).softmax(1), (s / tau).log_softmax(1)
    kl = (p_t * (p_t.log() - log_p_s)).sum()  # KL(teacher ‖ student), summed over the batch
    assert distillation_loss(s, t, "soft", tau) == pytest.approx((kl * tau**2 / s.numel()).item(), rel=1e-5)


def test_hard_distillation_uses_teacher_argmax_as_label():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, K, generator=g), torch.randn(6, K, generator=g)
    labels = t.argmax(1)
    expected = -s.log_softmax(1)[torch.arange(6), labels].mean()
    assert distillation_loss(s, t, "hard") == pytest.approx(expected.item(), rel=1e-6)


def test_label_smoothing_loss():
    g = torch.Generator().manual_seed(2)
    logits, y, eps = torch.randn(8, K, generator=g), torch.randint(0, K, (8,), generator=g), 0.1
    logp = logits.log_softmax(1)
    expected = ((1 - eps) * -logp[torch.arange(8), y] + eps * -logp.mean(1)).mean()
    assert ClassifyTask(K, label_smoothing=eps).criterion(logits, y) == pytest.approx(expected.item(), rel=1e-5)


def test_mixup_targets_give_soft_cross_entropy():
    task = ClassifyTask(K, MixupCutmix(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=K))
    model = randomize_heads(tiny())
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out = task(model, (images, labels), torch.Generator().manual_seed(0))
    mixed, targets = task.mix(images, labels, torch.Generator().manual_seed(0))  # the same draw
    assert targets.shape == (4, K) and torch.allclose(targets.sum(1), torch.ones(4))
    expected = F.cross_entropy(model(mixed), targets)  # torch's probability-target cross-entropy
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["count"] == 4


class TableTeacher(nn.Module):
    """A teacher with hand-set logits: image i (its pixel [0, 0, 0] holds i) gets row i of ``table``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)
        self.num_classes = table.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]  # (B, K)


# The teacher's logits for 4 images: argmax 3, 0, 4, 1, neither the labels 0, 1, 2, 3 nor one class for all, so a
# teacher of zeros (argmax 0, uniform probabilities) or one ignored in favour of the labels gives another loss.
TEACHER_LOGITS = torch.tensor([[0.0, 1.0, 0.0, 4.0, 0.0],
                               [3.0, 0.0, 1.0, 0.0, 0.0],
                               [0.0, 0.0, 2.0, 0.0, 5.0],
                               [1.0, 2.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_distill_task_combines_class_and_distillation_heads(kind):
    student = randomize_heads(tiny("deit_tiny_distilled_patch16_224"), seed=3)
    teacher = TableTeacher(TEACHER_LOGITS.clone())
    task = DistillTask(ClassifyTask(K), teacher, kind=kind, alpha=0.3, tau=2.0)
    task.prepare(student)
    student.train()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    images[:, 0, 0, 0] = torch.arange(4.0)  # the teacher's row
    out = task(student, (images, labels), torch.Generator())
    cls_logits, dist_logits = student(images)  # distilled training mode returns both heads
    if kind == "hard":  # the teacher's argmax, read off the table above
        distill = F.cross_entropy(dist_logits, torch.tensor([3, 0, 4, 1]))
    else:  # KL(teacher ‖ student) at τ = 2, times τ², over B·K (DeiT)
        p_t = (TEACHER_LOGITS / 2).softmax(1)
        distill = (p_t * (p_t.log() - (dist_logits / 2).log_softmax(1))).sum() * 4 / dist_logits.numel()
    expected = 0.7 * F.cross_entropy(cls_logits, labels) + 0.3 * distill
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained
    assert student.head_dist.weight.grad is not None and student.head.weight.grad is not None


def test_teacher_input_renormalises_to_the_teachers_statistics():
    raw = torch.rand(2, 3, 8, 8)
    s_mean, s_std, t_mean, t_std = (0.5,) * 3, (0.5,) * 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    student_x = (raw - 0.5) / 0.5
    expected = (raw - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    torch.testing.assert_close(TeacherInput(s_mean, s_std, t_mean, t_std)(student_x), expected)
    assert TeacherInput(s_mean, s_std, s_mean, s_std, (16, 16))(student_x).shape == (2, 3, 16, 16)
