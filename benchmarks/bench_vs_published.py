"""flowar against the published FlowAR code: same config, same weights, same machine, one process.

    python benchmarks/bench_vs_published.py --ref /path/to/FlowAR [--configs small,S] [--runs 3]

--ref is a checkout of the published code (github.com/OliverRensu/FlowAR; its history, with the
model code at commit 21835c0, is mirrored at github.com/wangqiang9/FlowAR), fetched by the user:
nothing of it is copied here. Its package `models` is imported from that folder; its hard-coded
`.cuda()` calls are made no-ops on a machine without CUDA, so it runs on the CPU as it is.

For each configuration both models are built from the same published constructor arguments; the
published model's random weights are loaded into ours with `flowar.published.load_published`.
Timed side by side:
  * a training step (train mode, dropout as configured, label drop 0.1): forward, backward and an
    AdamW step (betas 0.9, 0.95, as the published training);
  * a generation (eval mode, no grad): the published `sample_tokens` against our `generate`, the
    same steps, cfg and guidance interval.
After one warm-up each, --runs pairs are timed, the two back to back with the first of a pair
alternating, and the ratio is the median of the pairs' ratios: this machine's speed drifts by
10-20% over minutes, and a pair sees the same drift. Agreement is checked on the same
inputs: the AR semantics, teacher-forced (the published forward's first half, spelled out below
from its public code), dropout off, largest absolute and relative difference.

Each (config, what) record is kept as JSON under --out, saved after each pair; pairs that exist
are not measured again, so a killed run resumes. The table is printed from those files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# The configurations of issue 19: published constructor arguments, batch, sampler.
CONFIGS = {
    "small": dict(args=dict(encoder_embed_dim=256, decoder_embed_dim=256, encoder_depth=3,
                            decoder_depth=3, encoder_num_heads=4, decoder_num_heads=4,
                            diffloss_d=2, diffloss_w=256, cross=False),
                  train_batch=8, gen_batch=8, sampler=dict(num_steps=25, cfg=3.0, guidance=0.9)),
    "S": dict(args=None, train_batch=4, gen_batch=4, sampler=dict(num_steps=25, cfg=4.3, guidance=0.9)),
}


def import_published(ref: Path):
    """The published `models.flowar` module, importable on a CPU-only machine."""
    if not (ref / "models" / "flowar.py").is_file():
        raise SystemExit(f"--ref {ref}: no models/flowar.py (not a checkout of the published FlowAR)")
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # the published code calls .cuda() inline
    sys.path.insert(0, str(ref))
    import models.flowar as published  # noqa: E402 (from --ref)
    return published


def build(published, name: str, **extra):
    """(published model, our model, constructor args), the same weights in both."""
    from flowar.published import PUBLISHED_CONFIGS, load_published

    # Dropout as the published training sets it (main_flowar.py: 0.1 each); its constructor's
    # own default is 0, load_published's 0.1: named here so both models train alike.
    args = {**(CONFIGS[name]["args"] or PUBLISHED_CONFIGS[name]), "attn_dropout": 0.1,
            "proj_dropout": 0.1, **extra}
    torch.manual_seed(0)
    theirs = published.FlowAR(img_size=256, vae_stride=16, **args)
    ours = load_published(theirs.state_dict(), {"img_size": 256, "vae_stride": 16, **args})
    return theirs, ours, args


def inputs(batch: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 16, 16, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device), y.to(device)


def published_semantics(model, latents, labels):
    """The published forward up to the flow loss (buffer_size 0): teacher-forced AR output."""
    scales, size = model.scale, latents.shape[-1]
    targets = [latents] + [F.interpolate(latents, (s, s), mode="area") for s in scales[::-1][1:]]
    targets = targets[::-1]
    x = [F.interpolate(F.interpolate(targets[i], (size, size), mode="bicubic"), (s, s), mode="area")
         for i, s in enumerate(scales[1:])]
    x = model.z_proj(torch.cat([model.patchify(m) for m in x], dim=1))
    cls = model.class_emb(labels.long())
    x = torch.cat([cls.unsqueeze(1), x], dim=1)
    return model.forward_mae_decoder(model.forward_mae_encoder(x, cls, model.mask), cls, model.mask)


def agreement(published, name: str, batch: int) -> dict:
    """Teacher-forced AR semantics of both on the same latents and labels. In train mode with
    dropout 0: the published attention takes a whole teacher-forced sequence only in train mode
    (in eval mode it applies its rotary table to one scale at a time, for the KV cache)."""
    theirs, ours, _ = build(published, name, attn_dropout=0.0, proj_dropout=0.0)
    theirs.train(), ours.train()
    x, y = inputs(batch, seed=1)
    with torch.no_grad():
        a, b = published_semantics(theirs, x, y), ours.semantics(x, y)
    diff = (a - b).abs()
    return {"max_abs": float(diff.max()), "max_rel": float((diff / a.abs().clamp_min(1e-6)).max()),
            "scale": float(a.abs().max())}


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(model, is_published: bool, batch: int, device: str = "cpu", autocast=None,
               forward=None):
    """One AdamW step of `model` on fixed inputs; `autocast` (a context, e.g. bf16) around the
    forward, `forward` in place of the model's own (e.g. its torch.compile; gpu_check.py)."""
    import contextlib

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
    x, y = inputs(batch, device=device)
    forward = forward or (model if is_published else (lambda a, b: model.loss(a, b)[0]))

    def step():
        with autocast or contextlib.nullcontext():
            loss = forward(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def generation(model, is_published: bool, batch: int, sampler: dict, device: str = "cpu"):
    model.eval()
    _, y = inputs(batch, device=device)

    @torch.no_grad()
    def generate():
        if is_published:
            return model.sample_tokens(num_steps=sampler["num_steps"], guidance=sampler["guidance"],
                                       cfg=sampler["cfg"], labels=y)
        return model.generate(y, num_steps=sampler["num_steps"], cfg=sampler["cfg"],
                              guidance_high=sampler["guidance"])
    return generate


def timed_call(name: str, what: str, impl: str, model):
    """The call that is timed: `what` ("train" or "generate") of `impl`'s model at config `name`."""
    spec = CONFIGS[name]
    if what == "train":
        return train_step(model, impl == "published", spec["train_batch"])
    return generation(model, impl == "published", spec["gen_batch"], spec["sampler"])


def measure(out: Path, published, name: str, runs: int) -> None:
    """Timed runs in pairs, published and flowar back to back (the first of each pair
    alternating), so that a slow spell of a shared machine hits both alike. Each finished pair is
    saved: a killed run resumes at the next one."""
    if load(out, f"{name}-agreement") is None:
        save(out, f"{name}-agreement", agreement(published, name, 2))
    models = None
    for what in ("train", "generate"):
        key = f"{name}-{what}"
        record = load(out, key) or {"published": [], "flowar": [], "threads": torch.get_num_threads()}
        if len(record["flowar"]) >= runs:
            continue
        models = models or build(published, name)[:2]
        fns = {impl: timed_call(name, what, impl, model)
               for impl, model in zip(("published", "flowar"), models)}
        for fn in fns.values():
            fn()  # warm-up
        while len(record["flowar"]) < runs:
            print(f"measuring {key}: pair {len(record['flowar']) + 1} of {runs} ...", file=sys.stderr, flush=True)
            order = ("published", "flowar") if len(record["flowar"]) % 2 == 0 else ("flowar", "published")
            for impl in order:
                record[impl].append(once(fns[impl]))
            save(out, key, record)


def load(out: Path, key: str) -> dict | None:
    path = out / f"{key}.json"
    return json.loads(path.read_text()) if path.exists() else None


def save(out: Path, key: str, data: dict) -> None:
    tmp = out / f"{key}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.rename(out / f"{key}.json")


def table(out: Path, names: list[str]) -> str:
    lines = ["| config | what | runs | published (s, median) | flowar (s, median) | "
             "published / flowar: median of pairs (range) |", "|---|---|---:|---:|---:|---:|"]
    notes = []
    for name in names:
        spec = CONFIGS[name]
        for what, label in (("train", f"training step, batch {spec['train_batch']}"),
                            ("generate", f"generation of {spec['gen_batch']}, {spec['sampler']}")):
            r = load(out, f"{name}-{what}")
            if r and r["flowar"]:
                a, b = r["published"][:len(r["flowar"])], r["flowar"]
                pairs = [x / y for x, y in zip(a, b)]
                lines.append(f"| {name} | {label} | {len(b)} | {statistics.median(a):.2f} | "
                             f"{statistics.median(b):.2f} | {statistics.median(pairs):.2f}x "
                             f"({min(pairs):.2f}-{max(pairs):.2f}) |")
        agree = load(out, f"{name}-agreement")
        if agree:
            notes.append(f"{name}: AR semantics, teacher-forced, dropout off: max abs difference "
                         f"{agree['max_abs']:.2e} (values up to {agree['scale']:.2f}), max relative "
                         f"{agree['max_rel']:.2e}")
    return "\n".join(lines + [""] + notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="a checkout of the published FlowAR code")
    p.add_argument("--configs", default="small,S", help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--out", default=str(HERE / ".bench_vs_published"))
    a = p.parse_args(argv)
    names = a.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    published = import_published(Path(a.ref).resolve())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        measure(out, published, name, a.runs)
    print(table(out, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
