"""A head saved beside the model (order_policy.pt, edit_policy.pt) is continued as it is: a recipe that asks for
another shape of it is refused by name instead of being silently ignored; leaving the keys at their defaults, or
setting them to the saved values, continues the head."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dllm_rl.config import EditPolicyConfig, OrderPolicyConfig
from dllm_rl.errors import ConfigError
from dllm_rl.policy import EditHead, EditHeadConfig, OrderHead, OrderHeadConfig
from dllm_rl.policy.edit_head import edit_head_for
from dllm_rl.policy.order_head import order_head_for


@pytest.fixture
def saved(model_factory, tmp_path):
    model = model_factory()
    model.save_pretrained(tmp_path)
    H = model.config.hidden_size
    OrderHead(OrderHeadConfig(hidden_size=H, width=16, heads=2, base="top_prob")).save(tmp_path)
    EditHead(EditHeadConfig(hidden_size=H, width=16, heads=2, max_insert=2, init_bias=2.0)).save(tmp_path)
    return model, tmp_path


def test_a_saved_order_head_refuses_another_shape(saved):
    model, path = saved
    assert order_head_for("policy", model, str(path), OrderPolicyConfig()).cfg.width == 16  # defaults: continued
    assert order_head_for("policy", model, str(path), OrderPolicyConfig(width=16, heads=2)).cfg.heads == 2
    with pytest.raises(ConfigError, match=r"order_policy.width=32, order_policy.base='none': model.path holds a tra"):
        order_head_for("policy", model, str(path), OrderPolicyConfig(width=32, base="none"))


def test_a_saved_edit_head_refuses_another_shape(saved):
    model, path = saved
    rollout = SimpleNamespace(edit="any", edit_max_insert=2)
    assert edit_head_for(rollout, model, str(path), EditPolicyConfig()).cfg.init_bias == 2.0
    with pytest.raises(ConfigError, match=r"edit_policy.heads=8: .*\(.*edit_policy.pt: heads=2\)"):
        edit_head_for(rollout, model, str(path), EditPolicyConfig(heads=8))
