"""Built-in specs on real torch modules: permuting keeps the function; weight matching undoes a shuffle.

The modules are written here with the parameter names of torchvision's ResNet
and Hugging Face's ViT and GPT-2 (GPT-2 with Conv1D (in, out) weights and the
fused `c_attn`), so the specs are checked against the naming they target.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from merging.alignment import (
    AttentionGroup,
    apply_permutations,
    invert_permutation,
    load_spec,
    random_permutations,
    weight_matching,
)
from merging.errors import CheckpointError, RecipeError

@pytest.fixture(autouse=True)
def _float64():
    """Modules in float64, so "same function" can be checked tightly."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)



def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in sd.items()}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights (a state_dict aliases the parameters that `load_state_dict` overwrites)."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def module(**children: nn.Module) -> nn.Module:
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, including LayerNorm/BatchNorm affine parameters and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel() if p.dim() > 1 else 1)))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def run_with(model: nn.Module, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(x)


def check_recovers(spec, sd: dict[str, torch.Tensor], seed: int = 1) -> None:
    """Shuffle every group of `sd`, match it back: permutation recovered and weights equal."""
    sizes = spec.validate(shapes_of(sd))
    perms = random_permutations(spec, sizes, seed=seed)
    shuffled = apply_permutations(spec, sd, perms)
    assert any(not torch.equal(shuffled[n], sd[n]) for n in spec.permuted_tensors())
    result = weight_matching(spec, sd, shuffled, seed=0)
    assert result.converged
    for group, p in perms.items():
        assert torch.equal(result.perms[group], invert_permutation(p)), group
    back = apply_permutations(spec, shuffled, result.perms)
    for name in sd:
        assert torch.equal(back[name], sd[name]), name
    expected = sum(float((t.double() ** 2).sum()) for n, t in sd.items() if n in spec.cost_tensors())
    assert result.objective == pytest.approx(expected, rel=1e-9)


def check_function_kept(spec, model: nn.Module, sd: dict[str, torch.Tensor], x: torch.Tensor, perms) -> torch.Tensor:
    before = run_with(model, sd, x)
    after = run_with(model, apply_permutations(spec, sd, perms), x)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-10)
    return before


# -- MLP ---------------------------------------------------------------------------


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 9), nn.ReLU(), nn.Linear(9, 5))
    return randomise(module(layers=layers), seed)


class MLP(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        self.layers = make_mlp(seed).layers

    def forward(self, x):
        return self.layers(x)


def test_mlp_spec_shape():
    sd = state_of(MLP(0))
    spec = load_spec("mlp", shapes_of(sd))
    assert spec.axes == {
        "layers.0.weight": ("P_layers.0", None), "layers.0.bias": ("P_layers.0",),
        "layers.2.weight": ("P_layers.2", "P_layers.0"), "layers.2.bias": ("P_layers.2",),
        "layers.4.weight": ("P_layers.4", "P_layers.2"), "layers.4.bias": ("P_layers.4",),
        "layers.6.weight": (None, "P_layers.4"), "layers.6.bias": (None,),
    }


def test_mlp_natural_order_beyond_ten_layers():
    sd = {}
    for i in range(12):
        sd[f"net.{i}.weight"] = torch.zeros(4, 4)
    spec = load_spec("mlp", shapes_of(sd))
    assert spec.axes["net.2.weight"] == ("P_net.2", "P_net.1")
    assert spec.axes["net.10.weight"] == ("P_net.10", "P_net.9")
    assert spec.axes["net.11.weight"] == (None, "P_net.10")


def test_mlp_function_and_recovery():
    model = MLP(0)
    sd = state_of(model)
    spec = load_spec("mlp", shapes_of(sd))
    x = torch.randn(7, 12)
    check_function_kept(spec, model, sd, x, random_permutations(spec, spec.validate(shapes_of(sd)), seed=5))
    check_recovers(spec, sd)
    # Aligning an independently initialised model keeps that model's function.
    other = state_of(MLP(1))
    result = weight_matching(spec, sd, other, seed=0)
    torch.testing.assert_close(run_with(model, apply_permutations(spec, other, result.perms), x), run_with(model, other, x))


# -- ResNet (torchvision naming) -------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's layout: conv1, bn1, maxpool, layer1..N, avgpool, fc."""

    def __init__(self, block, widths, blocks, seed, stem=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        self.stages = len(widths)
        for s, (w, n) in enumerate(zip(widths, blocks), start=1):
            layers = []
            for b in range(n):
                layers.append(block(cin, w, 2 if (s > 1 and b == 0) else 1))
                cin = w * (4 if block is Bottleneck else 1)
            setattr(self, f"layer{s}", nn.Sequential(*layers))
        self.fc = nn.Linear(cin, classes)
        randomise(self, seed)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for s in range(1, self.stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_resnet_function_and_recovery(kind):
    if kind == "basic":  # ResNet-20 layout: three stages, identity blocks and projection shortcuts
        model = ResNet(BasicBlock, (8, 12, 16), (2, 2, 2), seed=0)
    else:
        model = ResNet(Bottleneck, (4, 6), (2, 1), seed=0)
    sd = state_of(model)
    spec = load_spec("resnet", shapes_of(sd))
    assert "layer1.0.bn1.num_batches_tracked" not in spec.axes
    assert spec.axes["layer1.0.bn1.running_var"] in (("P_layer1.0.conv1",),)
    assert "layer1.0.bn1.running_mean" in spec.cost_exclude
    if kind == "basic":
        # Stage 1 (no projection) writes into the stem's stream; stage 2 starts its own.
        assert spec.axes["layer1.1.conv2.weight"] == ("P_stem", "P_layer1.1.conv1", None, None)
        assert spec.axes["layer2.0.downsample.0.weight"] == ("P_layer2", "P_stem", None, None)
        assert spec.axes["layer2.1.conv2.weight"][0] == "P_layer2"
        assert spec.axes["fc.weight"] == (None, "P_layer3")
    else:
        assert spec.axes["layer1.0.conv3.weight"] == ("P_layer1", "P_layer1.0.conv2", None, None)
        assert spec.axes["layer1.1.conv1.weight"][1] == "P_layer1"
    x = torch.randn(2, 3, 8, 8)
    sizes = spec.validate(shapes_of(sd))
    check_function_kept(spec, model, sd, x, random_permutations(spec, sizes, seed=3))
    check_recovers(spec, sd)
    other = state_of(ResNet(BasicBlock, (8, 12, 16), (2, 2, 2), seed=1) if kind == "basic" else ResNet(Bottleneck, (4, 6), (2, 1), seed=1))
    result = weight_matching(spec, sd, other, seed=0)
    torch.testing.assert_close(run_with(model, apply_permutations(spec, other, result.perms), x), run_with(model, other, x))


def test_resnet_identity_block_that_changes_width_is_a_clear_error():
    sd = state_of(ResNet(BasicBlock, (8, 12), (1, 1), seed=0))
    sd = {n: t for n, t in sd.items() if "layer2.0.downsample" not in n}
    with pytest.raises(CheckpointError) as err:
        load_spec("resnet", shapes_of(sd))
    assert "layer2.0" in str(err.value) and "P_stem" in str(err.value)


# -- ViT (Hugging Face naming) --------------------------------------------------------


def mha(x, q, k, v, heads):
    b, n, d = x.shape
    split = lambda t: t.reshape(b, n, heads, -1).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads)
    out = scores.softmax(-1) @ split(v)
    return out.transpose(1, 2).reshape(b, n, -1)


class ViT(nn.Module):
    """ViTForImageClassification's parameter names: vit.embeddings…, vit.encoder.layer.N…, vit.layernorm, classifier."""

    def __init__(self, seed, d=12, heads=3, depth=2, mlp=20, patch=4, image=8, classes=4, pooler=False):
        super().__init__()
        self.heads = heads
        patches = (image // patch) ** 2
        emb = module(
            cls_token=nn.Parameter(torch.zeros(1, 1, d)),
            position_embeddings=nn.Parameter(torch.zeros(1, patches + 1, d)),
            patch_embeddings=module(projection=nn.Conv2d(3, d, patch, patch)),
        )
        layers = nn.ModuleList()
        for _ in range(depth):
            layers.append(module(
                attention=module(
                    attention=module(query=nn.Linear(d, d), key=nn.Linear(d, d), value=nn.Linear(d, d)),
                    output=module(dense=nn.Linear(d, d)),
                ),
                intermediate=module(dense=nn.Linear(d, mlp)),
                output=module(dense=nn.Linear(mlp, d)),
                layernorm_before=nn.LayerNorm(d),
                layernorm_after=nn.LayerNorm(d),
            ))
        vit = module(embeddings=emb, encoder=module(layer=layers), layernorm=nn.LayerNorm(d))
        if pooler:
            vit.pooler = module(dense=nn.Linear(d, d))
        self.vit = vit
        self.classifier = nn.Linear(d, classes)
        randomise(self, seed)

    def forward(self, x):
        e = self.vit.embeddings
        h = e.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
        h = torch.cat([e.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + e.position_embeddings
        for layer in self.vit.encoder.layer:
            a = layer.attention.attention
            z = layer.layernorm_before(h)
            h = h + layer.attention.output.dense(mha(z, a.query(z), a.key(z), a.value(z), self.heads))
            z = layer.layernorm_after(h)
            h = h + layer.output.dense(F.gelu(layer.intermediate.dense(z)))
        h = self.vit.layernorm(h)[:, 0]
        if hasattr(self.vit, "pooler"):
            h = torch.tanh(self.vit.pooler.dense(h))
        return self.classifier(h)


def test_vit_spec_groups():
    sd = state_of(ViT(0))
    spec = load_spec("vit", shapes_of(sd), config={"num_attention_heads": 3})
    assert spec.axes["vit.embeddings.cls_token"] == (None, None, "P_res")
    assert spec.axes["vit.embeddings.patch_embeddings.projection.weight"] == ("P_res", None, None, None)
    assert spec.axes["vit.encoder.layer.1.attention.attention.key.weight"] == ("P_qk.1", "P_res")
    assert spec.axes["vit.encoder.layer.1.attention.output.dense.weight"] == ("P_res", "P_vo.1")
    assert spec.axes["vit.encoder.layer.0.output.dense.weight"] == ("P_res", "P_mlp.0")
    assert spec.axes["classifier.weight"] == (None, "P_res")
    assert spec.attention == (AttentionGroup("P_qk.0", "P_vo.0", 3), AttentionGroup("P_qk.1", "P_vo.1", 3))


@pytest.mark.parametrize("attention", ["heads", "within", "off"])
def test_vit_function_and_recovery(attention):
    model = ViT(0, pooler=True)
    sd = state_of(model)
    spec = load_spec("vit", shapes_of(sd), num_heads=3, attention=attention)
    sizes = spec.validate(shapes_of(sd))
    x = torch.randn(2, 3, 8, 8)
    perms = random_permutations(spec, sizes, seed=4)
    if attention == "heads":
        assert not torch.equal(perms["P_qk.0"][::4] // 4, torch.arange(3))  # heads really move in this draw
    check_function_kept(spec, model, sd, x, perms)
    check_recovers(spec, sd)
    other = state_of(ViT(1, pooler=True))
    result = weight_matching(spec, sd, other, seed=0)
    torch.testing.assert_close(run_with(model, apply_permutations(spec, other, result.perms), x), run_with(model, other, x))


def test_vit_unstructured_qk_permutation_would_change_the_function():
    """Why attention groups exist: a free permutation of the Q/K axis regroups dims across heads."""
    model = ViT(0)
    sd = state_of(model)
    spec = load_spec("vit", shapes_of(sd), num_heads=3)
    sizes = spec.validate(shapes_of(sd))
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    perms["P_qk.0"] = torch.tensor([0, 4, 2, 3, 1, 5, 6, 7, 8, 9, 10, 11])  # swaps a dim of head 0 with one of head 1
    x = torch.randn(2, 3, 8, 8)
    changed = run_with(model, apply_permutations(spec, sd, perms), x)
    assert not torch.allclose(changed, run_with(model, sd, x), atol=1e-6)


def test_vit_needs_a_head_count():
    sd = state_of(ViT(0))
    with pytest.raises(RecipeError) as err:
        load_spec("vit", shapes_of(sd))
    assert "num_heads" in str(err.value)
    assert load_spec("vit", shapes_of(sd), attention="off").attention == ()


# -- GPT-2 (Hugging Face naming, Conv1D, fused c_attn) -------------------------------------


class Conv1D(nn.Module):
    """transformers' Conv1D: weight stored (in, out), y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class GPT2(nn.Module):
    """GPT2LMHeadModel's names: transformer.wte/wpe/h.N.(ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj)/ln_f, lm_head (tied)."""

    def __init__(self, seed, d=12, heads=3, depth=2, vocab=11, positions=6):
        super().__init__()
        self.heads = heads
        blocks = nn.ModuleList()
        for _ in range(depth):
            attn = module(c_attn=Conv1D(3 * d, d), c_proj=Conv1D(d, d))
            attn.register_buffer("bias", torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions))
            blocks.append(module(ln_1=nn.LayerNorm(d), attn=attn, ln_2=nn.LayerNorm(d),
                                 mlp=module(c_fc=Conv1D(4 * d, d), c_proj=Conv1D(d, 4 * d))))
        self.transformer = module(wte=nn.Embedding(vocab, d), wpe=nn.Embedding(positions, d), h=blocks, ln_f=nn.LayerNorm(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        randomise(self, seed)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, ids):
        t = self.transformer
        n = ids.shape[1]
        h = t.wte(ids) + t.wpe(torch.arange(n))
        for block in t.h:
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(h.shape[-1], dim=-1)
            b = h.shape[0]
            split = lambda z: z.reshape(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731
            scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // self.heads)
            scores = scores.masked_fill(~block.attn.bias[:, :, :n, :n], float("-inf"))
            ctx = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, -1)
            h = h + block.attn.c_proj(ctx)
            h = h + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(h)), approximate="tanh"))
        return self.lm_head(t.ln_f(h))


def test_gpt2_spec_groups():
    sd = state_of(GPT2(0))
    spec = load_spec("gpt2", shapes_of(sd), config={"n_head": 3})
    assert spec.axes["transformer.h.0.attn.c_attn.weight"] == ("P_res", ("P_qk.0", "P_qk.0", "P_vo.0"))
    assert spec.axes["transformer.h.0.attn.c_attn.bias"] == (("P_qk.0", "P_qk.0", "P_vo.0"),)
    assert spec.axes["transformer.h.1.attn.c_proj.weight"] == ("P_vo.1", "P_res")
    assert spec.axes["transformer.h.1.mlp.c_fc.weight"] == ("P_res", "P_mlp.1")
    assert spec.axes["transformer.wte.weight"] == (None, "P_res")
    assert spec.axes["lm_head.weight"] == (None, "P_res")
    assert "transformer.h.0.attn.bias" not in spec.axes  # the causal-mask buffer is copied
    assert spec.validate(shapes_of(sd))["P_qk.0"] == 12


@pytest.mark.parametrize("attention", ["heads", "within", "off"])
def test_gpt2_function_and_recovery(attention):
    model = GPT2(0)
    sd = state_of(model)
    spec = load_spec("gpt2", shapes_of(sd), num_heads=3, attention=attention)
    sizes = spec.validate(shapes_of(sd))
    ids = torch.tensor([[1, 5, 2, 9, 3, 0], [4, 4, 7, 10, 6, 8]])
    check_function_kept(spec, model, sd, ids, random_permutations(spec, sizes, seed=6))
    check_recovers(spec, sd, seed=2)
    other = state_of(GPT2(1))
    result = weight_matching(spec, sd, other, seed=0)
    torch.testing.assert_close(run_with(model, apply_permutations(spec, other, result.perms), ids), run_with(model, other, ids))


def test_gpt2_heads_are_really_permuted():
    """With head permutation on, matching a head-shuffled copy must move heads (not just dims)."""
    sd = state_of(GPT2(0))
    spec = load_spec("gpt2", shapes_of(sd), num_heads=3)
    sizes = spec.validate(shapes_of(sd))
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    head_order = torch.tensor([2, 0, 1])
    for g in ("P_qk.0", "P_vo.0"):
        perms[g] = (head_order[:, None] * 4 + torch.arange(4)).reshape(-1)
    shuffled = apply_permutations(spec, sd, perms)
    result = weight_matching(spec, sd, shuffled, seed=3)
    assert torch.equal(result.perms["P_qk.0"], invert_permutation(perms["P_qk.0"]))
    within = load_spec("gpt2", shapes_of(sd), num_heads=3, attention="within")
    kept = weight_matching(within, sd, shuffled, seed=3)
    assert torch.equal(kept.perms["P_qk.0"][::4] // 4, torch.arange(3))  # heads stay in place
    assert kept.objective < result.objective


def test_unknown_tensor_is_named():
    sd = state_of(GPT2(0))
    sd["transformer.h.0.adapter.weight"] = torch.zeros(3, 12)
    with pytest.raises(CheckpointError) as err:
        load_spec("gpt2", shapes_of(sd), num_heads=3)
    assert "transformer.h.0.adapter.weight" in str(err.value)
