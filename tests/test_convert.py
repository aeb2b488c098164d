"""The strict importer: every key consumed once, every leaf assigned once, shapes checked."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import jaxconv
from jaxconv import MappingError
from jaxconv.parity import rel_err


def state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def vgg11_state():
    torch.manual_seed(0)
    return state(torchvision.models.vgg11())


def test_resnet_style_weights_for_vgg16_name_the_first_keys_that_differ():
    torch.manual_seed(0)
    resnet = state(torchvision.models.resnet18())
    with pytest.raises(MappingError) as err:
        jaxconv.from_torchvision("vgg16", resnet)
    message = str(err.value)
    assert "cannot load these weights into vgg16" in message
    assert "missing keys" in message and "features.0.weight, features.0.bias" in message
    assert "unexpected keys" in message and "conv1.weight, bn1.weight" in message


def test_wrong_depth_weights_for_vgg16(vgg11_state):
    with pytest.raises(MappingError) as err:
        jaxconv.from_torchvision("vgg16", vgg11_state)
    message = str(err.value)
    # vgg11's third conv sits at features.6 with 128 outputs; vgg16 has 64 -> 128 there
    assert "shape mismatches" in message and "features.3.weight" in message
    assert "missing keys" in message


def test_a_missing_and_an_extra_key_are_both_listed(vgg11_state):
    broken = dict(vgg11_state)
    del broken["features.0.bias"]
    broken["features.0.extra"] = np.zeros(3, np.float32)
    with pytest.raises(MappingError, match=r"1 missing, 1 unexpected, 0 shape") as err:
        jaxconv.from_torchvision("vgg11", broken)
    assert "features.0.bias" in str(err.value) and "features.0.extra" in str(err.value)


def test_a_transposed_kernel_is_a_shape_mismatch(vgg11_state):
    broken = dict(vgg11_state)
    broken["classifier.3.weight"] = np.ascontiguousarray(broken["classifier.3.weight"][:, :100].T)
    with pytest.raises(MappingError, match=r"classifier.3.weight: file has \(100, 4096\)"):
        jaxconv.from_torchvision("vgg11", broken)


def test_every_leaf_is_assigned_exactly_once(vgg11_state):
    variables = jaxconv.from_torchvision("vgg11", vgg11_state)
    model = jaxconv.get_model("vgg11")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(variables)):
        assert a.shape == b.shape
    n_source = sum(v.size for v in vgg11_state.values())
    assert sum(v.size for v in jax.tree.leaves(variables)) == n_source


def test_the_flatten_permutation_maps_torchs_chw_order():
    # The first Linear after the trunk reads (C, H, W): its converted rows must follow
    # the NHWC flatten. Check on the numbers: torch's Linear on the CHW flatten equals
    # jaxconv's on the NHWC flatten.
    torch.manual_seed(0)
    model = torchvision.models.alexnet()
    variables = jaxconv.from_torchvision("alexnet", state(model))
    fmap = np.random.default_rng(0).standard_normal((2, 256, 6, 6)).astype(np.float32)
    with torch.no_grad():
        ref = model.classifier[1](torch.from_numpy(fmap).flatten(1)).numpy()
    p = variables["params"]["classifier_1"]
    mine = fmap.transpose(0, 2, 3, 1).reshape(2, -1) @ p["kernel"] + p["bias"]
    assert rel_err(mine, ref) < 1e-5


def test_sources_torch_tensors_paths_and_wrappers(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(num_classes=7)
    from_tensors = jaxconv.from_torchvision("vgg11_bn", model.state_dict())
    path = tmp_path / "vgg.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    from_file = jaxconv.from_torchvision("vgg11_bn", path)
    assert from_file["params"]["classifier_6"]["kernel"].shape == (4096, 7)  # classes read from the head
    for a, b in zip(jax.tree.leaves(from_tensors), jax.tree.leaves(from_file)):
        np.testing.assert_array_equal(a, b)
    assert "num_batches_tracked" not in str(jax.tree_util.tree_structure(from_file))


def test_float64_weights_stay_float64():
    torch.manual_seed(0)
    model = torchvision.models.alexnet().double()
    variables = jaxconv.from_torchvision("alexnet", state(model))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype("float64")}


def test_non_tensor_entries_are_named():
    with pytest.raises(TypeError, match="'features.0.weight' is a str"):
        jaxconv.from_torchvision("vgg11", {"features.0.weight": "oops"})
