"""The Moebius student against the reference vectors, the released manifest and its own config."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path
from safetensors.torch import load_file

from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.models.lambda_layers import CrossLambda, PositionConv, SelfLambda

RELEASED_PARAMS = 226_041_531


@pytest.fixture(scope="module")
def parity():
    """The reduced reference student with its weights, eval mode."""
    root = shared_path("reference", "parity")
    cfg = MoebiusConfig.from_original(json.loads((root / "config.json").read_text())["config"])
    model = MoebiusUNet(cfg).eval()
    model.load_state_dict(load_file(str(root / "weights.safetensors")), strict=True)
    return model, root


def _io(root, name):
    return load_file(str(root / f"inputs_{name}.safetensors")), load_file(
        str(root / f"outputs_{name}.safetensors")
    )


def test_from_original_reads_reference_config(parity):
    model, root = parity
    meta = json.loads((root / "config.json").read_text())
    cfg = model.config
    assert cfg.sample_size == meta["derived"]["sample_size"] == 32
    assert cfg.block_out_channels == (32, 64, 128)
    assert (cfg.num_attention_heads, cfg.cross_attention_dim, cfg.encoder_hid_dim) == (8, 48, 96)
    assert cfg.num_context_tokens == meta["derived"]["cross_lambda_m"]
    assert sum(p.numel() for p in model.parameters()) == meta["derived"]["num_parameters"]


def test_from_original_rejects_unknown_keys_but_reads_the_full_diffusers_config():
    root = shared_path("reference", "parity")
    meta = json.loads((root / "config.json").read_text())
    original = meta["config"]
    full = {**original, "model": meta["full_effective_init_config"]}  # every diffusers key
    assert MoebiusConfig.from_original(full) == MoebiusConfig.from_original(original)
    bad = {**original, "model": {**original["model"], "use_lambda_self_attn": True}}  # a typo
    with pytest.raises(ValueError, match=r"unsupported original model keys \['use_lambda_self"):
        MoebiusConfig.from_original(bad)
    other = {**original, "model": {**original["model"], "mid_block_type": "UNetMidBlock2D"}}
    with pytest.raises(ValueError, match="mid_block_type"):
        MoebiusConfig.from_original(other)


@pytest.mark.parametrize("name", ["A", "B"])
def test_noise_pred_matches_reference_fp32(parity, name):
    model, root = parity
    inputs, outputs = _io(root, name)
    with torch.no_grad():
        eps, feats = model(
            inputs["sample"], inputs["timesteps"], inputs["input_ids"], return_features=True
        )
    assert eps.shape == outputs["noise_pred"].shape
    assert (eps - outputs["noise_pred"]).abs().max() < 1e-4
    for i, feat in enumerate(feats):
        if f"block_outputs.{i}" in outputs:
            assert (feat - outputs[f"block_outputs.{i}"]).abs().max() < 1e-4, f"block {i}"
    assert len(feats) == 6


@pytest.mark.parametrize("name", ["A", "B"])
def test_noise_pred_matches_reference_fp64(parity, name):
    model, root = parity
    inputs, outputs = _io(root, name)
    model64 = MoebiusUNet(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    with torch.no_grad():
        eps = model64(inputs["sample"].double(), inputs["timesteps"], inputs["input_ids"])
    assert eps.dtype == torch.float64
    assert (eps - outputs["noise_pred_fp64"]).abs().max() < 1e-10


def test_intermediate_modules_match_reference(parity):
    """Each layer type alone against the hooked probes of set A."""
    model, root = parity
    inputs, out = _io(root, "A")
    inter = {k.removeprefix("intermediate."): v for k, v in out.items() if "intermediate" in k}
    unet = model.diff_model
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    context = inter["encoder_hid_proj.out"]

    def grid(tokens):  # row-major tokens [B, n, C] -> NCHW
        b, n, c = tokens.shape
        s = int(n**0.5)
        return tokens.transpose(1, 2).reshape(b, c, s, s)

    def tokens(x):
        return x.flatten(2).transpose(1, 2)

    with torch.no_grad():
        t = torch.tensor([900, 900])
        from moebius.models.embeddings import timestep_sinusoid

        temb = unet.time_embedding(timestep_sinusoid(t, 32))
        checks = {
            "time_embedding": (temb, inter["time_embedding.out"]),
            "encoder_hid_proj": (
                unet.encoder_hid_proj(model.embedding_layer(inputs["input_ids"])),
                context,
            ),
            "conv_in": (unet.conv_in(inputs["sample"]), inter["conv_in.out"]),
            "resnet": (
                unet.down_blocks[0].resnets[0](inter["down0.resnet0.in"], temb),
                inter["down0.resnet0.out"],
            ),
            "transformer2d": (
                unet.down_blocks[0].attentions[0](inter["down0.attn0.in"], context),
                inter["down0.attn0.out"],
            ),
            "self_lambda": (
                tokens(block.attn1(grid(inter["down0.attn0.attn1_selflambda.in"]))),
                inter["down0.attn0.attn1_selflambda.out"],
            ),
            "cross_lambda": (
                tokens(block.attn2(grid(inter["down0.attn0.attn2_crosslambda.in"]), context)),
                inter["down0.attn0.attn2_crosslambda.out"],
            ),
            "mixffn": (
                tokens(block.ff(grid(inter["down0.attn0.ff_mixffn.in"]))),
                inter["down0.attn0.ff_mixffn.out"],
            ),
            "up_resnet_with_skip": (
                unet.up_blocks[0].resnets[2](inter["up0.resnet2.in"], temb),
                inter["up0.resnet2.out"],
            ),
        }
    for name, (ours, ref) in checks.items():
        assert ours.shape == ref.shape, name
        assert (ours - ref).abs().max() < 5e-5, name


def test_released_model_matches_manifest_on_meta():
    manifest = json.loads(shared_path("reference", "moebius_student_manifest.json").read_text())[
        "tensors"
    ]
    with torch.device("meta"):
        model = MoebiusUNet(MoebiusConfig())
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS
    assert set(state) == set(manifest) and len(state) == 1203
    for key, entry in manifest.items():
        assert list(state[key].shape) == entry["shape"], key
        assert str(state[key].dtype).removeprefix("torch.") == entry["dtype"], key


def test_other_configuration_follows_config():
    """Heads, widths and latent size come from the config, not from the released numbers."""
    cfg = MoebiusConfig(
        sample_size=24,
        block_out_channels=(24, 48, 96),
        num_attention_heads=4,
        cross_attention_dim=40,
        encoder_hid_dim=56,
        norm_num_groups=8,
        layers_per_block=1,
        mix_mlp_ratio=2.0,
        transformer_layers_per_block=2,
    )
    model = MoebiusUNet(cfg).eval()
    state = model.state_dict()
    for level, (c, grid) in enumerate([(24, 24), (48, 12), (96, 6)]):
        prefix = f"diff_model.down_blocks.{level}.attentions.0.transformer_blocks.0."
        assert state[prefix + "attn1.to_q.weight"].shape == (c, c, 1, 1)
        assert state[prefix + "attn1.to_k.weight"].shape == (c // 4, c, 1, 1)
        assert state[prefix + "attn1.pos_conv.weight"].shape == (c // 4, 1, 1, 15, 15)
        assert state[prefix + "attn2.rel_pos_emb"].shape == (grid * grid, 10, c // 4, 1)
        assert state[prefix + "attn2.to_k.weight"].shape == (c // 4, 40)
        assert state[prefix + "ff.inverted_conv.conv.weight"].shape == (4 * c, c, 1, 1)
    assert len(model.diff_model.up_blocks[0].resnets) == 2
    assert len(model.diff_model.down_blocks[1].attentions[0].transformer_blocks) == 2
    x = torch.randn(2, 9, 24, 24)
    ids = torch.tensor([list(range(10, 20)), list(range(10))])
    with torch.no_grad():
        eps, feats = model(x, torch.tensor([500]), ids, return_features=True)
    assert eps.shape == (2, 4, 24, 24)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (24, 12, 12),
        (48, 6, 6),
        (96, 6, 6),
        (96, 12, 12),
        (48, 24, 24),
        (24, 24, 24),
    ]
    assert torch.isfinite(eps).all()


def test_position_conv_equals_conv3d_layout():
    """The Conv2d fold gives exactly the released Conv3d over the value-channel depth axis."""
    torch.manual_seed(0)
    conv = PositionConv(dim_k=6, size=15)
    values = torch.randn(2, 5, 11, 13)
    ref = F.conv3d(values[:, None], conv.weight, conv.bias, padding=(0, 7, 7))  # (B, k, v, H, W)
    assert torch.equal(conv(values), ref.flatten(3))


def test_lambda_layers_match_einsum_definition():
    """y = q^T (lambda_c + lambda_p) written directly from the paper, per position."""
    torch.manual_seed(1)
    layer = CrossLambda(dim=16, context_dim=12, heads=4, dim_k=4, grid=5, context_len=3).eval()
    x, c = torch.randn(2, 16, 5, 5), torch.randn(2, 3, 12)
    q = layer.norm_q(layer.to_q(x)).reshape(2, 4, 4, 25)
    k = layer.to_k(c).softmax(dim=1)  # (B, l, k), softmax over tokens
    v = layer.norm_v(layer.to_v(c).transpose(1, 2))  # (B, v, l)
    lam_c = torch.einsum("blk,bvl->bkv", k, v)
    lam_p = torch.einsum("nlk,bvl->bnkv", layer.rel_pos_emb[..., 0], v)
    y = torch.einsum("bhkn,bnkv->bhvn", q, lam_c[:, None] + lam_p).reshape(2, 16, 5, 5)
    assert torch.allclose(layer(x, c), y, atol=1e-5)
    self_layer = SelfLambda(dim=16, heads=4, dim_k=4).eval()
    assert self_layer(torch.randn(1, 16, 7, 9)).shape == (1, 16, 7, 9)  # size-agnostic


def test_eval_and_train_mode_differ_only_through_batchnorm():
    torch.manual_seed(0)
    model = MoebiusUNet(MoebiusConfig.tiny())
    x, ids = torch.randn(2, 9, 16, 16), torch.randint(0, 20, (2, 10))
    with torch.no_grad():
        train_out = model.train()(x, torch.tensor([10]), ids)
        eval_out = model.eval()(x, torch.tensor([10]), ids)
        again = model(x, torch.tensor([10]), ids)
    assert not torch.allclose(train_out, eval_out)
    assert torch.equal(eval_out, again)


class TestValidation:
    model = MoebiusUNet(MoebiusConfig.tiny()).eval()
    ids = torch.zeros(1, 10, dtype=torch.long)

    def test_wrong_latent_size_names_native_size(self):
        with pytest.raises(ValueError, match=r"16x16 latent.*128x128-pixel"):
            self.model(torch.randn(1, 9, 24, 24), torch.tensor([1]), self.ids)

    def test_wrong_channels(self):
        with pytest.raises(ValueError, match=r"\[B, 9, H, W\]"):
            self.model(torch.randn(1, 4, 16, 16), torch.tensor([1]), self.ids)

    def test_input_ids_shape_and_range(self):
        x = torch.randn(1, 9, 16, 16)
        with pytest.raises(ValueError, match=r"\[B, 10\]"):
            self.model(x, torch.tensor([1]), torch.zeros(1, 5, dtype=torch.long))
        with pytest.raises(ValueError, match=r"\[0, 20\)"):
            self.model(x, torch.tensor([1]), torch.full((1, 10), 20))

    def test_timesteps_shape(self):
        x = torch.randn(2, 9, 16, 16)
        ids = torch.zeros(2, 10, dtype=torch.long)
        with pytest.raises(ValueError, match=r"shape \[1\] or \[B\]"):
            self.model(x, torch.tensor([1, 2, 3]), ids)
        with torch.no_grad():
            assert torch.equal(
                self.model(x, torch.tensor([7]), ids), self.model(x, torch.tensor([7, 7]), ids)
            )
