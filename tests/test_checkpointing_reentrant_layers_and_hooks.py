"""fastft.integration.checkpointing on hand-made modules (no transformers model needed): which checkpointed layers are
reentrant (a partial without use_reentrant is torch's default, reentrant; training_only skips layers in eval mode),
the input-grad hooks of transformers before 5.x (one `_require_grads_hook`), and their removal as
RemovableHandle.remove() would do it (every dict register_forward_hook filed the hook in)."""
import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from fastft.integration.checkpointing import drop_input_grad_hooks_if_unneeded, input_grad_hooks, reentrant_layers


def _model(**checkpoint_kwargs):
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4))
    layer = model[1]
    layer.gradient_checkpointing = True
    layer._gradient_checkpointing_func = functools.partial(checkpoint, **checkpoint_kwargs)
    return model


def _transformers_hook():
    """A closure named as transformers' enable_input_require_grads names its hook."""
    def make_inputs_require_grads(module, input, output):
        output.requires_grad_(True)
    make_inputs_require_grads.__qualname__ = ("PreTrainedModel.enable_input_require_grads.<locals>."
                                              "make_inputs_require_grads")
    make_inputs_require_grads.__module__ = "transformers.modeling_utils"
    return make_inputs_require_grads


def test_a_partial_without_use_reentrant_is_reentrant():
    assert reentrant_layers(_model()) == [True]  # torch's default
    assert reentrant_layers(_model(use_reentrant=True)) == [True]
    assert reentrant_layers(_model(use_reentrant=False)) == [False]
    plain = nn.Sequential(nn.Linear(2, 2))
    plain[0].gradient_checkpointing, plain[0]._gradient_checkpointing_func = True, checkpoint
    assert reentrant_layers(plain) == [True]


def test_training_only_leaves_out_the_layers_in_eval_mode():
    model = _model()
    assert reentrant_layers(model.train(), training_only=True) == [True]
    assert reentrant_layers(model.eval(), training_only=True) == []
    assert reentrant_layers(model.eval()) == [True]


def test_the_single_hook_of_older_transformers_is_found_and_dropped():
    model = _model(use_reentrant=False)
    handle = model[0].register_forward_hook(_transformers_hook())
    model._require_grads_hook = handle  # transformers 4's record: one hook, not a list
    assert input_grad_hooks(model) == [handle]
    drop_input_grad_hooks_if_unneeded(model)
    assert not model[0]._forward_hooks and input_grad_hooks(model) == []


def test_a_dropped_hook_leaves_no_entry_in_any_hook_dict():
    model = _model(use_reentrant=False)
    model[0].register_forward_hook(_transformers_hook(), always_call=True)
    model[0].register_forward_hook(_transformers_hook(), with_kwargs=True)
    mine = model[0].register_forward_hook(lambda module, input, output: None)  # a user's hook stays
    drop_input_grad_hooks_if_unneeded(model)
    assert list(model[0]._forward_hooks) == [mine.id]
    assert not model[0]._forward_hooks_always_called and not model[0]._forward_hooks_with_kwargs


def test_checkpointing_enabled_reads_the_name_the_transformers_version_has():
    from fastft.integration.checkpointing import checkpointing_enabled

    class New(nn.Module):  # transformers 5's name only (a later release may drop the old alias)
        is_activation_checkpointing = property(lambda self: self.flag)

    class Old(nn.Module):
        is_gradient_checkpointing = property(lambda self: self.flag)

    for kind in (New, Old):
        for flag in (True, False):
            model = kind()
            model.flag = flag
            assert checkpointing_enabled(model) is flag, (kind, flag)
