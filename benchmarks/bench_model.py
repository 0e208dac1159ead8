"""Model speed on this machine: one training step, and generation with and without the KV cache.

    python benchmarks/bench_model.py [--presets small-cpu,S] [--batch 4] [--steps 25]

Prints a Markdown table; the KV-cache speed-up is generation time recomputing the whole prefix at
every scale divided by generation time with the cache, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from flowar import FlowAR, SamplerConfig


def timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up (allocations, kernel selection)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench(preset: str, batch: int, steps: int, device: str) -> dict:
    torch.manual_seed(0)
    model = FlowAR.from_preset(preset).to(device)
    cfg = model.config
    x = torch.randn(batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        total, _ = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    model.train()
    step_s = timed(train_step)
    model.eval()
    sampler = SamplerConfig(num_steps=steps, cfg=4.0, guidance_high=0.9)
    cached = timed(lambda: model.generate(y, sampler=sampler), repeats=1)
    recompute = timed(lambda: model.generate(y, sampler=sampler, kv_cache=False), repeats=1)
    # the AR part alone, where the cache acts: flow steps = 0 is not allowed, so time 1-step runs
    one = SamplerConfig(num_steps=1, cfg=4.0, time_grid="uniform")
    ar_cached = timed(lambda: model.generate(y, sampler=one), repeats=1)
    ar_recompute = timed(lambda: model.generate(y, sampler=one, kv_cache=False), repeats=1)
    return dict(preset=preset, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                train_step_s=step_s, train_img_s=batch / step_s, gen_s=cached,
                gen_img_s=batch / cached, gen_recompute_s=recompute, kv_speedup=recompute / cached,
                ar_kv_speedup=ar_recompute / ar_cached)


def table(rows: list[dict], batch: int, steps: int, device: str) -> str:
    lines = [f"Model speed ({device}, batch {batch}, {steps} sampling steps, CFG on)", "",
             "| preset | params (M) | train step (s) | train img/s | generate (s) | gen img/s | "
             "generate w/o KV cache (s) | KV-cache speed-up | speed-up of the AR part (1 step) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params_m']:.1f} | {r['train_step_s']:.3f} | "
                     f"{r['train_img_s']:.1f} | {r['gen_s']:.2f} | {r['gen_img_s']:.2f} | "
                     f"{r['gen_recompute_s']:.2f} | {r['kv_speedup']:.2f}x | {r['ar_kv_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small-cpu,S")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = [bench(n, a.batch, a.steps, a.device) for n in a.presets.split(",")]
    out = table(rows, a.batch, a.steps, a.device)
    print(out)
    return out


if __name__ == "__main__":
    main()
