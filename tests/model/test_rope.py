"""RoPE's complex multiply (cpu, cuda) against the real arithmetic that MPS runs and against Meta's own
formulation (freqs_cis from torch.polar, as llama's reference code computes it)."""
import pytest
import torch

from slowllama.model.transformer import (
    apply_rope,
    rope_frequencies,
    rope_real,
    rope_tables,
)


def _meta_rope(x: torch.Tensor, theta: float, rot: int) -> torch.Tensor:
    """llama's apply_rotary_emb, written independently: freqs_cis = polar(1, t * f), x as complex pairs."""
    freqs = rope_frequencies(rot, theta, None)
    angles = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    xc = torch.view_as_complex(x[..., :rot].float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs_cis).flatten(-2)
    return torch.cat((out, x[..., rot:].float()), dim=-1).type_as(x)


@pytest.mark.parametrize("rot", [16, 8])  # the whole head, and partial rotary (Phi-3)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rope_equals_the_real_arithmetic_and_metas(rot, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 5, 16).to(dtype)
    cos, sin = rope_tables(11, rot, 10000.0, "cpu")
    got = apply_rope(x, cos, sin)
    pairs = x[..., :rot].float().unflatten(-1, (-1, 2))
    real = torch.cat((rope_real(pairs, cos[None, :, None, :], sin[None, :, None, :]), x[..., rot:].float()), -1)
    # The same products and sums; a kernel may fuse one multiply-add, which moves the last bit only.
    torch.testing.assert_close(got, real.type_as(x), atol=5e-7, rtol=0 if dtype == torch.float32 else 8e-3)
    torch.testing.assert_close(got, _meta_rope(x, 10000.0, rot), atol=2e-6 if dtype == torch.float32 else 1e-2, rtol=0)
    assert torch.equal(got[..., rot:], x[..., rot:])


def test_per_sequence_tables_rotate_each_sequence_at_its_own_positions():
    """The KV cache's (bs, seqlen, rot // 2) tables: a sequence at positions 3.. ropes as the shared table's rows 3.."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, 8)
    cos, sin = rope_tables(10, 8, 10000.0, "cpu")
    pos = torch.tensor([[0, 1, 2, 3], [3, 4, 5, 6]])
    got = apply_rope(x, cos[pos], sin[pos])
    assert torch.equal(got[0], apply_rope(x[:1], cos[:4], sin[:4])[0])
    assert torch.equal(got[1], apply_rope(x[1:], cos[3:7], sin[3:7])[0])


def test_complex_rope_gradient_is_the_inverse_rotation():
    """Autograd through the complex multiply: the gradient of sum(w * rope(x)) is w turned back, as the real
    formulation's backward gives it (within rounding: the sums run in another order)."""
    torch.manual_seed(2)
    x = torch.randn(2, 6, 4, 16, requires_grad=True)
    w = torch.randn(2, 6, 4, 16)
    cos, sin = rope_tables(6, 16, 500000.0, "cpu")
    (apply_rope(x, cos, sin) * w).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (rope_real(xr.unflatten(-1, (-1, 2)), cos[None, :, None, :], sin[None, :, None, :]) * w).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, apply_rope(w, cos, -sin), atol=1e-6, rtol=0)
