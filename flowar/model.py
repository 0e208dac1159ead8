"""FlowAR: a scale-wise autoregressive transformer whose per-token semantics condition a flow net
that turns noise into each scale's latent, coarse to fine.

    model = FlowAR.from_preset("S")
    total, per_scale = model.loss(latents, labels)          # training
    latents = model.generate(labels, num_steps=25, cfg=4.3, guidance_high=0.9)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import pyramid
from .ar import ScaleAR
from .config import (ConfigError, FlowARConfig, SamplerConfig, check_sampler_fits, from_dict,
                     preset_config, saved_model_config, to_dict)
from .flownet import FlowNet
from .layers import KVCache
from .objective import noisy_input_and_target, sample_time, scale_weights
from .sampling import cfg_for_scale, guided_fn, integrate, integrate_ddim, time_grid

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
FORMAT = "flowar/1"


class FlowAR(nn.Module):
    def __init__(self, config: FlowARConfig):
        super().__init__()
        self.config = config
        # Set by from_pretrained (flowar/hub.py ExportInfo): the export's other files, which
        # save_pretrained and push_to_hub write back with the weights.
        self.export_info = None
        self.ar = ScaleAR(config)
        self.flow = FlowNet(config)
        self.init_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FlowAR":
        """Presets S, B, L, H (paper Table 8) and the debug sizes `tiny`, `small-cpu`."""
        return cls(preset_config(name, **overrides))

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ------------------------------------------------------------------ initialisation
    def init_weights(self):
        """Published init: xavier-uniform for every Linear (the flow net's included: the published
        parent re-initialises it after construction), N(0, 0.02) for embeddings and position
        tables. `init="zero"` instead zeroes the adaLN gates' and the final layer's projections
        (adaLN-Zero), so that every block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.ar.class_embed.weight, std=0.02)
        for p in (self.ar.pos_embed, self.ar.second_pos_embed, self.ar.semantics_pos_embed):
            nn.init.normal_(p, std=0.02)
        if self.config.init == "zero":
            zero = [self.flow.final_layer.linear, self.flow.final_layer.ada_lin[-1]]
            zero += [blk.ada_lin[-1] for blk in self.ar.blocks]
            for blk in self.flow.blocks:
                zero += [getattr(blk, n) for n in ("ada_lin", "ada_lin_attn", "ada_lin_mlp") if hasattr(blk, n)]
            for m in zero:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ training
    def scale_maps(self, latents: torch.Tensor, scale_targets=None) -> list[torch.Tensor]:
        """Each scale's target map: downsampled latents, or the given image-derived maps."""
        cfg = self.config
        pyramid.check_latents(latents, cfg.scales, cfg.latent_channels)
        if cfg.scale_construction == "latent":
            if scale_targets is not None:
                raise ConfigError("scale_targets given, but model.scale_construction is 'latent'")
            return pyramid.targets(latents, cfg.scales)
        if scale_targets is None or len(scale_targets) != len(cfg.scales):
            raise ConfigError("model.scale_construction='image' needs scale_targets: one latent "
                              "map per scale, encoded from the downsampled image")
        for s, m in zip(cfg.scales, scale_targets):
            if tuple(m.shape[1:]) != (cfg.latent_channels, s, s):
                raise ConfigError(f"scale_targets: scale {s} map has shape {tuple(m.shape)}, "
                                  f"expected (B, {cfg.latent_channels}, {s}, {s})")
        return list(scale_targets)

    def semantics(self, latents: torch.Tensor, labels: torch.Tensor, scale_targets=None) -> torch.Tensor:
        """Teacher-forced AR output (B, L, ar_width): scales coarse to fine, raster order."""
        maps = self.scale_maps(latents, scale_targets)
        return self.ar(pyramid.teacher_inputs(maps, self.config.scales, self.config.scale_input), labels)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        """The flow net on one scale: (B, s^2, C) noisy tokens -> (B, s^2, C) prediction
        (the velocity eps - x for flow matching, eps for the diffusion objective)."""
        return self.flow(x_t, t, semantics)

    def loss(self, latents: torch.Tensor, labels: torch.Tensor, t=None, noise=None, scale_targets=None):
        """(total, per_scale). `t` and `noise`, when given, are lists per scale ((B,), (B, s^2, C));
        then no randomness is drawn and no label is dropped. `scale_targets`: see scale_maps."""
        cfg = self.config
        given = t is not None and noise is not None
        if self.training and not given and cfg.label_drop > 0:
            drop = torch.rand(labels.shape, device=labels.device) < cfg.label_drop
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        maps = self.scale_maps(latents, scale_targets)
        sem = self.ar(pyramid.teacher_inputs(maps, cfg.scales, cfg.scale_input), labels)
        per_scale = []
        for k, (start, end) in enumerate(pyramid.segments(cfg.scales)):
            x = pyramid.to_tokens(maps[k])
            t_k = t[k] if t is not None else sample_time(x.shape[0], cfg, x.device)
            eps = noise[k] if noise is not None else torch.randn_like(x)
            x_t, target, t_net = noisy_input_and_target(x, eps, t_k, cfg)
            pred = self.flow(x_t, t_net, sem[:, start:end])
            per_scale.append((pred.float() - target.float()).pow(2).mean())
        total = sum(w * l for w, l in zip(scale_weights(cfg), per_scale))
        return total, per_scale

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, labels: torch.Tensor | None, num_steps: int | None = None,
                 cfg: float | None = None, guidance_high: float | None = None, noise=None, *,
                 sampler: SamplerConfig | None = None, generator: torch.Generator | None = None,
                 num_samples: int | None = None, kv_cache: bool = True) -> torch.Tensor:
        """Sample finest-scale latents (B, C, H, W), still normalised.

        labels None (or all null) gives unconditional samples (num_samples of them). `noise`,
        when given, is each scale's starting noise: (2B, s^2, C) with CFG (conditional half first,
        as the published sampler draws it) or (B, s^2, C). kv_cache=False recomputes the whole
        prefix at every scale instead (the block-causal mask makes it equal; for benchmarks)."""
        conf = sampler or SamplerConfig()
        overrides = {k: v for k, v in dict(num_steps=num_steps, cfg=cfg,
                                           guidance_high=guidance_high).items() if v is not None}
        conf = from_dict(SamplerConfig, {**to_dict(conf), **overrides}, "sampler")
        mc = self.config
        check_sampler_fits(mc.objective, conf)
        device, dtype = self.ar.pos_embed.device, self.ar.pos_embed.dtype
        if labels is None:
            if num_samples is None:
                raise ConfigError("generate: give labels, or num_samples for unconditional samples")
            labels = torch.full((num_samples,), self.null_class, dtype=torch.long, device=device)
        labels = labels.to(device)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class):
            raise ConfigError(f"generate: labels must be in [0, {self.null_class}] "
                              f"({self.null_class} = unconditional), got {labels.tolist()}")
        B = labels.shape[0]
        guided = conf.cfg > 1.0 and bool((labels != self.null_class).any())
        ar_labels = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels

        cache, ar_input, tokens, prefix = KVCache(), None, None, []
        grid = time_grid(conf.num_steps, conf.time_grid) if mc.objective == "flow" else None
        for k, side in enumerate(mc.scales):
            if kv_cache:
                sem = self.ar.step(ar_input, ar_labels, k, cache)
            else:
                sem = self._recompute_step(prefix, ar_labels, k)
            sem_cond, sem_uncond = (sem[:B], sem[B:]) if guided else (sem, None)
            cfg_k = cfg_for_scale(k, len(mc.scales), conf.cfg, conf.cfg_schedule)
            if noise is not None:
                start = noise[k][:B].to(device)
            else:
                start = torch.randn((B, side * side, mc.latent_channels), device=device,
                                    dtype=dtype, generator=generator)
            v_fn = guided_fn(self.flow, sem_cond, sem_uncond, cfg_k, conf, dtype)
            if mc.objective == "flow":
                tokens = integrate(v_fn, start, grid, conf.solver, generator).to(dtype)
            else:
                tokens = integrate_ddim(v_fn, start, conf.num_steps, mc.diffusion_steps).to(dtype)
            if k + 1 < len(mc.scales):
                nxt = pyramid.next_scale_input(pyramid.to_maps(tokens, side), mc.scales[k + 1],
                                               mc.latent_size, mc.scale_input)
                ar_input = pyramid.to_tokens(nxt)
                if guided:
                    ar_input = torch.cat([ar_input, ar_input])
                prefix.append(ar_input)
        return pyramid.to_maps(tokens, mc.scales[-1])

    def _recompute_step(self, prefix: list[torch.Tensor], labels: torch.Tensor, k: int):
        """Semantics of scale k from a full forward over the prefix; later scales are zero
        placeholders that the block-causal mask hides from scale k."""
        mc = self.config
        dtype = self.ar.pos_embed.dtype
        inputs = torch.zeros(labels.shape[0], mc.num_tokens - 1, mc.latent_channels,
                             device=labels.device, dtype=dtype)
        if prefix:
            done = torch.cat(prefix, dim=1)
            inputs[:, : done.shape[1]] = done
        start, end = pyramid.segments(mc.scales)[k]
        return self.ar(inputs, labels)[:, start:end]

    # ------------------------------------------------------------------ checkpoints and the Hub
    def save_pretrained(self, directory: str | Path, extra: dict | None = None, *,
                        latents: dict | None = None, results: dict | None = None,
                        details: dict | None = None) -> Path:
        """An export folder (flowar/hub.py): config.json (the model and `extra` entries such as
        "training"), model.safetensors, the companion files this model was loaded with,
        latents.json from `latents` (the latent dataset's metadata), evaluation.json from
        `results` (metric -> value; `details`: how they were measured), and README.md, the
        model card rendered from them."""
        from safetensors.torch import save_file

        from . import hub
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        carried = self.export_info
        meta = {"format": FORMAT, "model": to_dict(self.config),
                **(carried.extra if carried else {}), **(extra or {})}
        (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILE), metadata={"format": FORMAT})
        hub.write_companions(d, carried.companions if carried else None, latents=latents,
                             results=results, details=details)
        hub.write_model_card(d)
        return d

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu", *,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        token: str | bool | None = None, subfolder: str = "",
                        local_files_only: bool = False, force_download: bool = False) -> "FlowAR":
        """Load an export: a local folder, or a Hub repo id `org/name` (a string that is not an
        existing path), fetched into the Hub cache at `revision` (a branch, tag or commit;
        default main), read from the cache alone when HF_HUB_OFFLINE=1. `subfolder`: the export
        inside the folder or repo. Every tensor must fit the config (load_exact). The returned
        model's `export_info.folder` is the local folder read (latents.json and ema.safetensors,
        when the export has them, are there)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from . import hub
        d = hub.resolve_export(name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                               subfolder=subfolder, local_files_only=local_files_only,
                               force_download=force_download)
        name = hub.describe(name_or_path, d)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"{name} is not a FlowAR checkpoint: {p.name} is missing")
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{cfg_path}: format {meta.get('format')!r} is not {FORMAT!r}")
        model = cls(saved_model_config(meta.get("model")))
        try:
            state = load_file(str(w_path), device=str(device))
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{w_path}: unreadable or truncated safetensors file ({e})") from None
        load_exact(model, state, str(w_path))
        model.export_info = hub.read_export_info(name_or_path, d, meta)
        return model.to(device)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    branch: str | None = None, commit_message: str | None = None,
                    create_pr: bool = False, results: dict | None = None,
                    details: dict | None = None) -> str:
        """Publish this model as the Hub model repo `repo_id` (org/name, created if missing):
        save_pretrained into a temporary folder (with the files it was loaded with: the training
        link, latents.json, results), then that whole folder in one commit. Returns the commit
        URL. To publish an export folder exactly as it is on disk (ema.safetensors included),
        use flowar.hub.push_export(folder, repo_id)."""
        import tempfile

        from . import hub
        hub.check_repo_id(repo_id)  # before writing the weights out
        with tempfile.TemporaryDirectory(prefix="flowar-push-") as tmp:
            self.save_pretrained(tmp, results=results, details=details)
            return hub.push_export(tmp, repo_id, token=token, private=private, branch=branch,
                                   commit_message=commit_message, create_pr=create_pr)


def load_exact(model: nn.Module, state: dict, source: str) -> None:
    """load_state_dict that names every missing, unexpected or wrongly shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if shapes:
        problems.append("wrong shapes: " + "; ".join(shapes[:20]))
    if problems:
        raise ConfigError(f"{source} does not fit the model: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)
