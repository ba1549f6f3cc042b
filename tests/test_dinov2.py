"""DINOv2 and SimDINOv2: the methods equal their pure losses on one process, centres, Sinkhorn-Knopp
targets, last-layer freezing, registers and layer scale through timm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslcli.config import DINOv2Config, ModelConfig, SimDINOv2Config
from sslcli.data import Batch
from sslcli.losses import (cosine_patch_loss, dino_cross_entropy, ibot_patch_loss, koleo_loss, simdino_loss,
                           sinkhorn_knopp)
from sslcli.methods import StepContext, build_method
from run_checks import assert_two_processes_match_one

TINY_VIT = ModelConfig(arch="vit_small_patch16_224", drop_path_rate=0.0,
                       kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
                               "reg_tokens": 2, "init_values": 1e-5})
DINOV2 = dict(out_dim=16, ibot_out_dim=12, hidden_dim=32, bottleneck_dim=8, warmup_teacher_temp_epochs=0,
              teacher_temp=0.07)


def tiny(cfg):
    torch.manual_seed(0)
    return build_method(TINY_VIT, cfg, epochs=2, steps_per_epoch=3)


def masked_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    batch = Batch.from_views([torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)] +
                             [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)])
    batch.masks = torch.rand(2, 4, 16, generator=g) < 0.3  # (G, B, N)
    batch.masks[1, 3] = False  # one crop without masked patches: counted in G, contributes 0
    return batch


def test_dinov2_loss_is_the_sum_of_its_pure_terms():
    method = tiny(DINOv2Config(**DINOV2))
    method.center.normal_()  # a non-zero centre, so centring is exercised
    batch = masked_batch()
    out = method.loss(batch, StepContext(0, 0, with_stats=True))
    flat = batch.masks.flatten(0, 1)
    with torch.no_grad():
        t_cls, _, t_patch = method.teacher(batch.global_views, [], batch.masks, mask_input=False)
    s_cls, s_feats, s_patch = method.student(batch.global_views, batch.local_views, batch.masks, True)
    q = [F.softmax((t - method.center) / 0.07, -1) for t in t_cls]
    dino = dino_cross_entropy(s_cls, q, 0.1)
    ibot = ibot_patch_loss(s_patch, F.softmax(t_patch / 0.07, -1), flat, 0.1)
    koleo = koleo_loss(s_feats[:4]) + koleo_loss(s_feats[4:])
    assert out.terms["dino"].item() == pytest.approx(dino.item(), rel=1e-5)
    assert out.terms["ibot"].item() == pytest.approx(ibot.item(), rel=1e-5)
    assert out.terms["koleo"].item() == pytest.approx(koleo.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((dino + ibot + 0.1 * koleo).item(), rel=1e-5)
    assert s_patch.shape == (int(flat.sum()), 16)  # shared head: patch logits have the CLS head's K


def test_dinov2_separate_head_and_sinkhorn_targets():
    method = tiny(DINOv2Config(**DINOV2, ibot_separate_head=True, centering="sinkhorn_knopp"))
    batch = masked_batch()
    out = method.loss(batch, StepContext(0, 0))
    with torch.no_grad():
        t_cls, _, t_patch = method.teacher(batch.global_views, [], batch.masks, mask_input=False)
    s_cls, _, s_patch = method.student(batch.global_views, batch.local_views, batch.masks, True)
    q = sinkhorn_knopp(torch.cat(t_cls), 0.07).chunk(2)  # one SK over both global views
    assert out.terms["dino"].item() == pytest.approx(dino_cross_entropy(s_cls, list(q), 0.1).item(), rel=1e-5)
    targets = sinkhorn_knopp(t_patch, 0.07)
    expected = ibot_patch_loss(s_patch, targets, batch.masks.flatten(0, 1), 0.1)
    assert out.terms["ibot"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert s_patch.shape[1] == 12 and method.student.patch_head is not None


def test_dinov2_centres_move_and_last_layers_freeze_in_the_first_epoch():
    method = tiny(DINOv2Config(**DINOV2, ibot_separate_head=True))
    out = method.loss(masked_batch(), StepContext(0, 0))
    out.loss.backward()
    method.cancel_gradients(StepContext(0, 0))
    for head in (method.student.head, method.student.patch_head):
        assert all(p.grad is None for p in head.last_layer.parameters())
        assert head.last_layer.weight_g.requires_grad  # the gain is trainable (norm_last_layer false)
    assert method.student.backbone.model.blocks[0].attn.qkv.weight.grad is not None
    method.after_step(StepContext(0, 0), out)
    assert method.center.abs().sum() > 0 and method.patch_center.abs().sum() > 0


def test_simdinov2_loss_is_simdino_plus_the_cosine_patch_loss():
    method = tiny(SimDINOv2Config(out_dim=16, hidden_dim=32))
    batch = masked_batch()
    out = method.loss(batch, StepContext(0, 0, with_stats=True))
    with torch.no_grad():
        t_cls, _, t_patch = method.teacher(batch.global_views, [], batch.masks, mask_input=False)
    s_cls, _, s_patch = method.student(batch.global_views, batch.local_views, batch.masks, True)
    cls_loss, alignment, expansion = simdino_loss(s_cls, t_cls, 0.05)
    flat = batch.masks.flatten(0, 1)
    full_s, full_t = torch.zeros(8, 16, 16), torch.zeros(8, 16, 16)
    full_s[flat], full_t[flat] = s_patch, t_patch
    patch = cosine_patch_loss(full_s, full_t, flat)
    assert out.terms["patch"].item() == pytest.approx(patch.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((cls_loss + patch).item(), rel=1e-5)
    assert {"coding_rate", "out_rank", "alignment"} <= set(out.stats)


def test_registers_and_layer_scale_come_from_timm():
    method = tiny(SimDINOv2Config(out_dim=16, hidden_dim=32))
    model = method.student.backbone.model
    assert model.num_prefix_tokens == 3 and model.reg_token.shape == (1, 2, 32)
    assert torch.allclose(model.blocks[0].ls1.gamma, torch.full((32,), 1e-5))
    cls, patch = method.student.backbone.forward_tokens(torch.randn(2, 3, 16, 16))
    assert patch.shape == (2, 16, 32)  # registers are not patch tokens


# ----------------------------------------------------------------------------- end to end

DINOV2_RUN = ["method.name=dinov2", "method.out_dim=32", "method.hidden_dim=32", "method.bottleneck_dim=16",
              "method.warmup_teacher_temp_epochs=0", "data.masking=dinov2", "data.mask_min_block=1"]
SIMDINOV2_RUN = ["method.name=simdinov2", "method.out_dim=16", "method.hidden_dim=32", "data.masking=dinov2",
                 "data.mask_min_block=1"]


@pytest.mark.parametrize("overrides", [DINOV2_RUN + ["method.koleo_weight=0"],
                                       DINOV2_RUN + ["method.koleo_weight=0", "method.centering=sinkhorn_knopp"],
                                       SIMDINOV2_RUN], ids=["dinov2", "dinov2-sk", "simdinov2"])
def test_one_epoch_with_two_processes_matches_one(tiny_config, tmp_path, overrides):
    """Masks, centres, Sinkhorn-Knopp sums and the Gram matrix do not depend on the process count
    (KoLeo is per process by definition, so it is switched off for the comparison)."""
    assert_two_processes_match_one(tiny_config(*overrides, "train.epochs=1"), tmp_path, steps=3)


def test_export_of_a_dinov2_run_loads_in_plain_timm_with_its_registers(tiny_config, tmp_path):
    import timm
    from safetensors.torch import load_file

    from sslcli.export import export_backbone
    from sslcli.runfiles import read_metadata
    from sslcli.train.pretrain import RunOptions, pretrain

    cfg = tiny_config(*DINOV2_RUN, "train.epochs=1", "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, "
                      "depth: 2, num_heads: 2, reg_tokens: 4, init_values: 1.0e-5}")
    pretrain(cfg, RunOptions(out=tmp_path / "run", device="cpu"))
    out = tmp_path / "backbone.safetensors"
    export_backbone(tmp_path / "run", out)
    meta = read_metadata(out)
    import json

    kwargs = json.loads(meta["timm_kwargs"])
    assert kwargs["reg_tokens"] == 4 and kwargs["init_values"] == 1e-5
    model = timm.create_model(meta["arch"], pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(load_file(out))  # strict: no mask token, registers present
    assert model.reg_token.shape == (1, 4, 32)


def test_the_mask_token_replaces_exactly_the_masked_positions_of_the_blocks_input():
    backbone = tiny(SimDINOv2Config(out_dim=16, hidden_dim=32)).student.backbone.eval()
    seen = []
    backbone.model.blocks.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    masks[1, 15] = True
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        backbone.mask_token.normal_()
        backbone.forward_tokens(x, masks)
        backbone.forward_tokens(x)
    changed = (seen[0] != seen[1]).any(-1)  # (B, prefix + N): which tokens differ
    prefix = backbone.model.num_prefix_tokens  # cls + 2 registers, never masked
    assert not changed[:, :prefix].any() and torch.equal(changed[:, prefix:], masks)
