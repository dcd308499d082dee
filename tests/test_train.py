"""Training from scratch on a tiny config: each phase lowers its loss, the run resumes, the export loads."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

import sdlite
from sdlite.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from sdlite.training import shapes
from sdlite.training.train import TrainConfig, Trainer, _images_to_tensor

TINY = ModelConfig(
    version="sdlite",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                    num_heads=2, context_dim=32),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    text=TextConfig(width=32, layers=1, heads=2),
    scale_factor=1.0,
    image_size=32,
)
CFG = TrainConfig(model=TINY, vae_steps=3, vae_batch=4, vae_crop=16, latent_pool=64, steps=3, batch=8,
                  decoder_steps=2, decoder_batch=2, warmup=1, save_every=2)



def test_one_autoencoder_step_lowers_the_loss_on_a_fixed_batch(tmp_path):
    trainer = Trainer(CFG, tmp_path)
    images, _, _ = shapes.sample_batch(4, 0, size_px=32)
    x = _images_to_tensor(images)
    fg = torch.ones(4, 1, 32, 32)

    def loss():
        torch.manual_seed(0)
        return trainer.vae_loss(x, fg)[0]

    with torch.no_grad():
        before = loss().item()
    for _ in range(3):
        trainer.opt_vae.zero_grad()
        loss().backward()
        trainer.opt_vae.step()
    with torch.no_grad():
        assert loss().item() < before


def test_one_diffusion_step_lowers_the_eps_loss_on_a_fixed_batch(tmp_path):
    trainer = Trainer(CFG, tmp_path)
    trainer.scale_factor = 1.0
    x0 = torch.randn(8, 4, 16, 16)
    captions = ["a red circle on the left"] * 4 + ["a blue square at the top"] * 4

    def loss():
        torch.manual_seed(0)
        return trainer.diffusion_loss(x0, captions)

    with torch.no_grad():
        before = loss().item()
    for _ in range(3):
        trainer.opt.zero_grad()
        loss().backward()
        trainer.opt.step()
    with torch.no_grad():
        assert loss().item() < before


def test_the_decoder_fine_tune_lowers_the_reconstruction_error_and_leaves_the_encoder_alone(tmp_path):
    trainer = Trainer(replace(CFG, decoder_steps=6, decoder_batch=4, decoder_lr=2e-3), tmp_path)
    images, _, _ = shapes.sample_batch(4, 0, size_px=32)
    x = _images_to_tensor(images)
    encoder = {k: v.clone() for k, v in trainer.vae.encoder.state_dict().items()}
    quant = {k: v.clone() for k, v in trainer.vae.quant_conv.state_dict().items()}
    decoder = {k: v.clone() for k, v in trainer.vae.decoder.state_dict().items()}

    def error():
        with torch.no_grad():
            return (trainer.vae.decode(trainer.vae.encode(x).mean) - x).abs().mean().item()

    before = error()
    trainer.train_decoder(progress=False)
    assert error() < before
    # the latent space is untouched (the UNet trained on it stays valid); the decoder did change
    assert all(torch.equal(v, trainer.vae.encoder.state_dict()[k]) for k, v in encoder.items())
    assert all(torch.equal(v, trainer.vae.quant_conv.state_dict()[k]) for k, v in quant.items())
    assert any(not torch.equal(v, trainer.vae.decoder.state_dict()[k]) for k, v in decoder.items())


def test_the_training_objective_uses_the_samplers_forward_process(tmp_path, monkeypatch):
    trainer = Trainer(CFG, tmp_path)
    calls = []
    real = type(trainer.schedule).add_noise

    def spy(self, x0, noise, t):
        calls.append(t)
        return real(self, x0, noise, t)

    monkeypatch.setattr(type(trainer.schedule), "add_noise", spy)
    trainer.diffusion_loss(torch.randn(2, 4, 16, 16), ["a", "b"])
    assert len(calls) == 1 and calls[0].shape == (2,)


def test_a_run_resumes_where_it_stopped_and_exports_a_loadable_model(tmp_path):
    first = Trainer(CFG, tmp_path / "run")
    first.run(progress=False)
    assert first.phase == "done" and (tmp_path / "run" / "state.pt").is_file()
    again = Trainer(CFG, tmp_path / "run")
    assert again.try_resume() and again.phase == "done" and again.scale_factor == first.scale_factor
    for a, b in zip(first.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    out = first.export(tmp_path / "tiny.safetensors")
    pipe = sdlite.load(out, device="cpu")
    assert pipe.config.version == "sdlite" and pipe.config.image_size == 32
    assert pipe.scale_factor == round(first.scale_factor, 5)
    image = pipe.txt2img("a red circle on the left", seed=1, steps=2)[0]
    assert image.size == (32, 32)


def test_a_run_saved_before_the_decoder_phase_existed_resumes_into_it(tmp_path):
    first = Trainer(CFG, tmp_path / "run")
    first.run(progress=False)
    state = torch.load(first.state_path, weights_only=False)
    del state["opt_decoder"]  # what runs saved before phase 3 look like
    torch.save(state, first.state_path)
    again = Trainer(CFG, tmp_path / "run")
    assert again.try_resume() and (again.phase, again.step) == ("decoder", 0)
    again.run(progress=False)
    assert again.phase == "done" and again.step == CFG.decoder_steps


def test_the_data_pool_never_contains_held_out_combinations(tmp_path):
    trainer = Trainer(replace(CFG, latent_pool=300), tmp_path)
    trainer.encode_pool()
    held = {shapes.caption(*a) for a in shapes.HELD_OUT}
    assert not held & {c[0] for c in trainer._captions}
    assert trainer._latents.shape == (300, 2, 4, 16, 16)
    assert np.isfinite(trainer.scale_factor) and trainer.scale_factor > 0
