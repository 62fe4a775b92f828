import pytest
import torch

from slowllama.data.windows import TokenWindows, read_text
from slowllama.errors import ConfigError


def test_exact_length_text_trains_on_its_one_window():
    w = TokenWindows(list(range(1, 10)), seq_len=8)
    for step in range(5):
        x, y = w.batch(step, 1, seed=3)
        assert x.tolist() == [list(range(1, 9))] and y.tolist() == [list(range(2, 10))]


def test_batches_depend_only_on_seed_and_step():
    w = TokenWindows(list(range(1000)), seq_len=16)
    a = [w.batch(s, 4, seed=1)[0] for s in range(3)]
    b = [w.batch(s, 4, seed=1)[0] for s in reversed(range(3))][::-1]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(w.batch(0, 4, seed=1)[0], w.batch(0, 4, seed=2)[0])
    x, y = w.batch(0, 4, seed=1)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_windows_cover_the_text_uniformly():
    w = TokenWindows(list(range(20)), seq_len=4)
    starts = torch.cat([w.batch(s, 64, seed=0)[0][:, 0] for s in range(50)])
    counts = torch.bincount(starts, minlength=16)
    assert counts.shape[0] == 16 and counts.min() > 0.5 * counts.float().mean()


def test_short_text_is_refused():
    with pytest.raises(ConfigError, match="fewer than --seq-len"):
        TokenWindows([1, 2, 3], seq_len=3)


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"  \n", "empty"), (b"\xff\xfe abc", "not UTF-8")])
def test_bad_text_files(tmp_path, content, match):
    p = tmp_path / "d.txt"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        read_text(p)
