"""walk.replay: outputs of a layer's final modules kept between two forwards on the same batch."""

from __future__ import annotations

import torch
from torch import nn

from compressor.walk.replay import Replay, finals


class Pair(nn.Module):
    def __init__(self, first: str, second: str, width: int) -> None:
        super().__init__()
        self.names = (first, second)
        self.add_module(first, nn.Linear(4, width))
        self.add_module(second, nn.Linear(width, 4))

    def forward(self, x):
        return getattr(self, self.names[1])(torch.tanh(getattr(self, self.names[0])(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp = Pair("q", "o", 4), Pair("up", "down", 8)

    def forward(self, x):
        h = x + self.attn(x)
        return h + self.mlp(h)


def test_finals_are_the_largest_modules_no_pending_change_reaches():
    layer = Block()
    assert finals(layer, {"attn.q"}, {"attn.o", "mlp.up", "mlp.down"}) == {"attn.q"}
    assert finals(layer, {"attn.q", "attn.o"}, {"mlp.up", "mlp.down"}) == {"attn"}
    assert finals(layer, {"attn.q", "attn.o", "mlp.up"}, {"mlp.down"}) == {"attn", "mlp.up"}
    assert finals(layer, set(), {"attn.q"}) == set()


def test_a_kept_module_is_replayed_on_equal_inputs_only():
    torch.manual_seed(0)
    layer, replay = Block(), Replay()
    x = torch.randn(3, 4)
    runs = []
    layer.attn.register_forward_pre_hook(lambda module, args: runs.append(1))  # hooks still fire on a replay
    calls = []
    forward = layer.attn.q.forward
    counting = layer.attn.q.forward = lambda x: calls.append(1) or forward(x)
    with replay.around(layer, 0, {"attn"}):
        first = layer(x)
    with replay.around(layer, 0, {"attn"}):
        again = layer(x)
    assert torch.equal(first, again) and len(calls) == 1 and len(runs) == 2  # the attention ran once
    with replay.around(layer, 0, {"attn"}):
        other = layer(x + 1)  # other inputs: run, and kept instead
    assert len(calls) == 2 and not torch.equal(other, first)
    replay.drop("attn.o")  # replaced: the block holding it forgets its output
    assert replay.batches[0] == {}
    with replay.around(layer, 0, {"attn.q"}):
        layer(x)
    with replay.around(layer, 0, set()):
        assert torch.equal(layer(x), first)  # q replayed, the rest run; nothing kept after
    assert len(calls) == 3 and replay.batches[0] == {}
    assert layer.attn.q.__dict__["forward"] is counting  # an instance's own forward is restored
