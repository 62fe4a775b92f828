"""RMSNorm's own backward against autograd through the plain formulas: Meta's (and LlamaRMSNorm's), Gemma's and
OLMo 2's."""
import pytest
import torch

from slowllama.model.transformer import CastLastRMSNorm, RMSNorm


def _plain(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float | None) -> torch.Tensor:
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset is None:  # Meta's (and LlamaRMSNorm's) order: cast, then scale
        return n.type_as(x) * weight
    return (n * (offset + weight.float())).type_as(x)  # Gemma's (offset 1) and OLMo 2's (0) RMSNorm


# hidden states (the last a Llama-2 block's, 1024 wide), and per-head q / k (Qwen3)
@pytest.mark.parametrize("shape", [(3, 7, 32), (2, 5, 4, 8), (2, 64, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [None, 1.0, 0.0], ids=["meta", "gemma", "olmo2"])
def test_norm_backward_equals_autograd_through_the_formula(shape, dtype, offset):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    norm = (RMSNorm(shape[-1], eps=1e-6) if offset is None else CastLastRMSNorm(shape[-1], 1e-6, offset)).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    g = torch.randn(shape).to(dtype)
    out = norm(x)
    out.backward(g)
    x2 = x.detach().clone().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    ref = _plain(x2, w2, 1e-6, offset)
    ref.backward(g)
    assert torch.equal(out, ref)  # the very same forward ops
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(norm.weight.grad, w2.grad, **tol)


def test_frozen_weight_takes_no_gradient_and_the_input_still_does():
    """LoRA freezes the norms: the backward skips the weight's sum and gives the input's gradient alone."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    norm = RMSNorm(8)
    norm.weight.requires_grad_(False)
    norm(x).sum().backward()
    assert norm.weight.grad is None and x.grad is not None and torch.isfinite(x.grad).all()


def test_a_second_derivative_is_refused_rather_than_wrong():
    """The backward treats the rsqrt as a constant, so differentiating it again would drop terms."""
    x = torch.randn(2, 8, requires_grad=True)
    (g,) = torch.autograd.grad(RMSNorm(8)(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
