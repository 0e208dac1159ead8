"""One prepared script of GPU checks for the model library (flowar/ and the training job's
pipelines/train/parallelize.py: torch, einops, timm, safetensors), sized to finish in about
5 minutes on one H200 so a lent device's 15 minutes cover a run and a rerun.

    python benchmarks/gpu_check.py --golden ../shared/golden --out gpu_check.md

Sections (each one runs even when an earlier one fails; its error is reported in its place):
  1. golden   the published-code reference vectors on the GPU in float32 (TF32 off): semantics,
              per-scale losses and sampled tokens, largest absolute differences.
  2. train    S preset, forward + backward: fp32+TF32 vs bf16 autocast vs bf16 + torch.compile,
              images/s side by side, peak memory, and how far bf16's loss is from fp32's.
  3. generate S and L, CFG, 25 Euler steps, bf16: images/s with the KV cache and without it.
  4. H        the 1.9B preset takes a bf16 step with gradient checkpointing: peak memory, s/step.
  5. published with --ref (a checkout of the published code): its training step and generation
              against flowar's, the same weights, bf16, and flowar compiled (issue 19's ratios).
  6. MFU      FlowAR-L's bf16 training step: FLOPs counted by torch.utils.flop_counter over the
              measured time, against --peak-tflops.

On a CPU (`--device cpu --small --no-compile`) the same code runs on debug presets, so the script
itself is tested here (tests/test_model.py) before a device is ever lent. On a lent H200 (its own
python3 has torch, einops, timm and safetensors; copy ../shared/golden into an ignored folder of the
checkout and name it in `carry`):

    PYTHONPATH=. python3 benchmarks/gpu_check.py --golden golden --out $OUT/gpu_check.md
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch

from flowar import FlowAR, SamplerConfig, load_published
from pipelines.train.parallelize import apply_activation_checkpointing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 3) -> float:
    fn()  # warm-up: allocations, kernel selection, compilation
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def peak_gib(device: str) -> str:
    if not device.startswith("cuda"):
        return "n/a"
    gib = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return f"{gib:.1f}"


def check_golden(golden: Path, device: str) -> list[str]:
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference was recorded in float32
    torch.backends.cudnn.allow_tf32 = False
    lines = ["| file | semantics max abs | per-scale loss max abs | tokens max abs |", "|---|---|---|---|"]
    for name in ("reference_v1_spatial_adaln.pt", "reference_v2_cross_attn.pt"):
        d = torch.load(golden / name, weights_only=True, map_location=device)
        model = load_published(d["state_dict"], d["config"]).to(device).eval()
        tr, s = d["train"], d["sample"]
        with torch.no_grad():
            sem = model.semantics(d["latents"], d["labels"])
            _, per_scale = model.loss(d["latents"], d["labels"], t=tr["t"], noise=tr["noise"])
            out = model.generate(d["labels"], s["num_steps"], s["cfg"], s["guidance_high"],
                                 noise=s["noise_per_scale"])
        diff = lambda a, b: f"{(a.float() - b.float()).abs().max().item():.2e}"
        lines.append(f"| {name} | {diff(sem, tr['semantics'])} | "
                     f"{diff(torch.stack(per_scale), tr['scale_loss'])} | {diff(out, s['tokens'])} |")
    return lines


def batch_for(model: FlowAR, n: int, device: str):
    cfg = model.config
    x = torch.randn(n, cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=device)
    return x, torch.randint(0, cfg.num_classes, (n,), device=device)


def check_train(preset: str, batch: int, device: str, compile_too: bool = True) -> list[str]:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = FlowAR.from_preset(preset, attn_dropout=0.0, proj_dropout=0.0).to(device).train()
    x, y = batch_for(model, batch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t = [torch.full((batch,), 0.5, device=device) for _ in model.config.scales]
    noise = [torch.randn(batch, s * s, model.config.latent_channels, device=device)
             for s in model.config.scales]
    # forward + backward only: no optimizer step, so every mode sees the same weights and the
    # loss column compares precisions alone
    lines = ["| mode | s per fwd+bwd | images/s | vs fp32 | peak GiB | loss |", "|---|---|---|---|---|---|"]
    base, loss_fp32 = None, None
    for mode in ("fp32+tf32", "bf16", "bf16+compile")[:3 if compile_too else 2]:
        fn = torch.compile(model.loss) if mode.endswith("compile") else model.loss
        amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                             enabled=mode.startswith("bf16"))

        def step():
            with amp:
                total, _ = fn(x, y, t=t, noise=noise)
            opt.zero_grad(set_to_none=True)
            total.backward()
            return total

        with torch.no_grad(), amp:
            loss = fn(x, y, t=t, noise=noise)[0].float().item()
        loss_fp32 = loss if loss_fp32 is None else loss_fp32
        seconds = timed(step, device)
        base = base or seconds
        lines.append(f"| {mode} | {seconds:.3f} | {batch / seconds:.1f} | {base / seconds:.2f}x | "
                     f"{peak_gib(device)} | {loss:.5f} ({abs(loss - loss_fp32) / loss_fp32:.1e} rel) |")
    return lines


def check_generate(presets: list[str], batch: int, steps: int, device: str) -> list[str]:
    lines = ["| preset | images/s, KV cache | images/s, recompute | speed-up | peak GiB |",
             "|---|---|---|---|---|"]
    for preset in presets:
        torch.manual_seed(0)
        model = FlowAR.from_preset(preset).to(device).eval()
        y = torch.arange(batch, device=device) % model.config.num_classes
        sampler = SamplerConfig(num_steps=steps, cfg=3.0, guidance_high=0.9)
        amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

        def run(cache: bool):
            with torch.no_grad(), amp:
                return model.generate(y, sampler=sampler, kv_cache=cache)
        cached = timed(lambda: run(True), device, repeats=2)
        full = timed(lambda: run(False), device, repeats=1)
        lines.append(f"| {preset} | {batch / cached:.1f} | {batch / full:.1f} | {full / cached:.2f}x | "
                     f"{peak_gib(device)} |")
    return lines


def check_large(preset: str, batch: int, device: str) -> list[str]:
    model = FlowAR.from_preset(preset).to(device).train()
    apply_activation_checkpointing(model)  # model.grad_checkpointing of a training job
    x, y = batch_for(model, batch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.startswith("cuda"))

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            total, _ = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    seconds = timed(step, device, repeats=2)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return [f"{preset}: {params:,.1f}M parameters, batch {batch}, bf16 + grad checkpointing + AdamW: "
            f"{seconds:.2f} s/step, peak {peak_gib(device)} GiB"]


def check_vs_published(ref: str, name: str, batch: int, device: str, compile_too: bool) -> list[str]:
    """The published code and flowar side by side on this device, the same weights
    (benchmarks/bench_vs_published.py): an AdamW training step and a CFG generation. The
    published code runs as its training does, under bf16 autocast; flowar in bf16 and, with
    compile, its loss compiled. Ratios are published seconds / flowar seconds."""
    if not ref:
        return ["skipped: give --ref, a checkout of the published FlowAR code (see "
                "benchmarks/bench_vs_published.py)"]
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_vs_published as bvp

    published = bvp.import_published(Path(ref).resolve())
    theirs, ours, _ = bvp.build(published, name)
    theirs, ours = theirs.to(device), ours.to(device)
    amp = lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)  # noqa: E731
    sampler = bvp.CONFIGS[name]["sampler"]

    def generate(model, is_published):
        fn = bvp.generation(model, is_published, batch, sampler, device)
        return lambda: _under(amp, fn)
    # factories: each sets its model's train/eval mode when built, right before it is timed
    rows = [("train", "published, bf16", lambda: bvp.train_step(theirs, True, batch, device, amp())),
            ("train", "flowar, bf16", lambda: bvp.train_step(ours, False, batch, device, amp()))]
    if compile_too:
        loss = torch.compile(lambda x, y: ours.loss(x, y)[0])
        rows.append(("train", "flowar, bf16 + compile",
                     lambda: bvp.train_step(ours, False, batch, device, amp(), forward=loss)))
    rows += [("generate", "published, bf16", lambda: generate(theirs, True)),
             ("generate", "flowar, bf16", lambda: generate(ours, False))]
    lines = [f"config {name}: training batch {batch}, generation of {batch}, {sampler}", "",
             "| what | implementation | seconds | published / this |", "|---|---|---|---|"]
    base = {}
    for what, label, make in rows:
        seconds = timed(make(), device, repeats=2)
        base.setdefault(what, seconds)  # the published row comes first
        lines.append(f"| {what} | {label} | {seconds:.3f} | {base[what] / seconds:.2f}x |")
    return lines


def _under(amp, fn):
    with amp():
        return fn()


def check_mfu(preset: str, batch: int, device: str, peak_tflops: float, compile_too: bool) -> list[str]:
    """Model FLOPs utilisation of a bf16 training step (forward, backward, AdamW): the step's
    FLOPs counted by torch.utils.flop_counter on one forward + backward, over its measured time,
    against `peak_tflops` (the device's dense bf16 peak)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = FlowAR.from_preset(preset).to(device).train()
    x, y = batch_for(model, batch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.startswith("cuda"))
    loss = torch.compile(model.loss) if compile_too else model.loss

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            total, _ = loss(x, y)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            total, _ = model.loss(x, y)
        total.backward()
    flops = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)
    seconds = timed(step, device, repeats=3)
    achieved = flops / seconds / 1e12
    return [f"{preset}, batch {batch}, bf16{' + compile' if compile_too else ''} + AdamW: "
            f"{flops / 1e12:.2f} TFLOP per step, {seconds:.3f} s/step, {achieved:.1f} TFLOP/s = "
            f"**{100 * achieved / peak_tflops:.1f}% MFU** of {peak_tflops:g} TFLOP/s, "
            f"peak {peak_gib(device)} GiB"]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--golden", default="../shared/golden", help="folder of the reference vectors")
    p.add_argument("--small", action="store_true", help="debug presets and batches (a CPU self-test)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile (on a 2-core CPU its compilation alone takes minutes)")
    p.add_argument("--out", default="", help="also write the report (Markdown) here")
    p.add_argument("--ref", default="", help="a checkout of the published FlowAR code: adds the "
                   "side-by-side section (benchmarks/bench_vs_published.py)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    a = p.parse_args(argv)
    small = a.small
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    report = [f"# flowar GPU check: {name}, torch {torch.__version__}", ""]
    sections = [
        ("golden (float32, TF32 off)", lambda: check_golden(Path(a.golden), a.device)),
        ("train step, S" if not small else "train step, tiny",
         lambda: check_train("tiny" if small else "S", 4 if small else 64, a.device, not a.no_compile)),
        ("generation, CFG, 25 steps, bf16",
         lambda: check_generate(["tiny"] if small else ["S", "L"], 4 if small else 64,
                                4 if small else 25, a.device)),
        ("largest preset", lambda: check_large("small-cpu" if small else "H", 2 if small else 8, a.device)),
        ("against the published code" if not small else "against the published code, small config",
         lambda: check_vs_published(a.ref, "small" if small else "S", 2 if small else 64, a.device,
                                    not a.no_compile)),
        ("training MFU, L" if not small else "training MFU, tiny",
         lambda: check_mfu("tiny" if small else "L", 2 if small else 64, a.device, a.peak_tflops,
                           not a.no_compile)),
    ]
    for title, fn in sections:
        block = [f"## {title}", ""]
        start = time.perf_counter()
        try:
            block += fn()
        except Exception:  # report and go on: one broken section must not cost the others
            block += ["```", traceback.format_exc().strip()[-2000:], "```"]
        block += ["", f"({time.perf_counter() - start:.0f} s)", ""]
        print("\n".join(block), flush=True)
        report += block
    text = "\n".join(report)
    if a.out:
        Path(a.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
