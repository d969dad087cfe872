import pytest
import torch

from bdsafety.models import MODELS, ModelSpec, create_model

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", SHAPES)
def test_every_model_fits_every_input_shape(name, shape):
    torch.manual_seed(0)
    model = create_model(ModelSpec(name, shape[0], 7, (0.5,) * shape[0], (0.5,) * shape[0])).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        z = model.features(x)
        logits = model(x)
        assert z.dim() == 4
        assert logits.shape == (2, 7)
        assert torch.allclose(model.head(z), logits)
    assert model.linear.out_features == 7


def test_small_model_is_about_a_third_of_a_million_parameters():
    model = create_model(ModelSpec("preact_small", 1, 10, (0.5,), (0.5,)))
    assert 250_000 < sum(p.numel() for p in model.parameters()) < 350_000
