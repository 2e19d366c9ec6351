"""Train lipcodec's embedded reference model (autoencoder, then the edit denoiser).

    python scripts/train_reference.py --stage both --minutes 7 --out runs/ref       # GPU
    python scripts/train_reference.py --stage dit --minutes 4 --out runs/ref2 --resume runs/ref
    python scripts/train_reference.py --stage decoder --minutes 6 --ae-lr 3e-4 --out runs/ref3 \
        --resume lipcodec/models/weights/reference.safetensors   # sharpen the decoder only
    python scripts/train_reference.py --stage both --ae-share 0.45 --minutes 8.2 --anchor 1 --ae-lr 1e-4 \
        --resume lipcodec/models/weights/reference.safetensors --out runs/ref4   # encoder too, anchored
    python scripts/train_reference.py --stage both --minutes 1 --out /tmp/smoke --small  # CPU smoke test

Seeded; stops itself after --minutes of wall clock (the budget is split between the
stages by --ae-share when --stage both). Writes to --out: ae.pt and dit.pt (float32
weights, what --resume reads; optimiser state is not kept, so a resumed run warms up
again), reference.safetensors (float16, EMA denoiser: what ships in
lipcodec/models/weights/), and log.json (losses, PSNR, steps, time, device).

Autoencoder: MSE + 0.1 L1 on [-1, 1] pixels, latent noise (5 % of the latent std) half the
time so the decoder tolerates denoiser outputs; afterwards per-channel latent mean/std are
measured and stored (latents are normalised like Wan's). ``--stage decoder`` trains the
decoder alone on a frozen encoder: the latent space, its normalisation and so the trained
denoiser stay valid. ``--edit-share`` replaces that share of the clips by an edited version
(a random word, ``--word-weights``): the decoder then also learns the latents the denoiser
produces (a grayscale clip's latents must decode without colour). ``--anchor W`` lets a
resumed encoder train too, with W x the mean squared drift of its normalised latents from
the resumed encoder's added to the loss and the normalisation kept: the latent space moves
little, and a denoiser run afterwards follows it (restarting the encoder freely threw the
denoiser back: docs/model-card.md).

Denoiser (WanTransformer3DModel): for a clip x and a random word w, the target is
z_e = E(edit_w(x)), the source z_s = E(x). SDEdit starts at strength s0 from
x_s0 = (1 - s0) z_s + s0 eps (s0 = 1 a third of the time, --generation-share: pure
generation), and the training path runs straight from x_s0 to z_e:
x_sigma = (1 - sigma/s0) z_e + sigma/s0 x_s0, velocity target v = (x_s0 - z_e) / s0, so
x0 = x_sigma - sigma v = z_e at every sigma (what lipcodec's restore and the streaming
runner assume), and Euler steps are exact on the path.
Loss s0^2 |v_pred - v|^2. 10 % of samples get the unconditional embedding (CFG).
Every third step is chunk-causal (Self-Forcing layout, 3 latent frames per chunk): earlier
chunks are clean (t = 0, the clean KV cache), the last chunk is noisy, attention is
block-causal (a chunk sees itself and earlier chunks), loss on the last chunk only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipcodec.models import CONFIG, Reference  # noqa: E402
from lipcodec.models.data import ClipSampler, holdout_clips  # noqa: E402
from lipcodec.models.edits import VOCABULARY, apply_edits  # noqa: E402
from lipcodec.models.evaluate import gray_round_trip  # noqa: E402

CHUNK = 3


def log_line(state: dict, text: str) -> None:
    print(f"[{time.perf_counter() - state['t0']:6.1f}s] {text}", flush=True)


def lr_at(frac: float, step: int, base: float, warmup: int = 100) -> float:
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (data range 1 after mapping to [0, 1])."""
    mse = ((a.float().clamp(-1, 1) - b.float()) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# -- the autoencoder ------------------------------------------------------------------------------
AE_SHAPES = [(17, 128, 128, 8), (17, 96, 128, 12), (13, 96, 96, 16), (9, 64, 64, 32), (17, 64, 128, 16)]


def train_ae(model, sampler, args, state, until: float, decoder_only: bool = False):
    ae = model.ae.train().requires_grad_(not decoder_only)
    if decoder_only:  # the frozen encoder keeps the latents the denoiser was trained on
        ae.encoder.eval()
        ae.decoder.requires_grad_(True)
    anchor = None
    if args.anchor > 0 and not decoder_only:  # a fine-tune that keeps the latent space the denoiser knows
        anchor = copy.deepcopy(ae).eval().requires_grad_(False)
    params = [p for p in ae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.ae_lr, weight_decay=0.0)
    held_out = holdout_clips(33, (128, 128))  # decoded once for the checks before and after
    before = holdout_psnr(model, state, held_out) if decoder_only else None
    gray_before = gray_round_trip(model, held_out) if decoder_only else None
    if before is not None:
        log_line(state, f"held-out PSNR before: {before}, gray round-trip chroma before: {gray_before}")
    dev, amp = state["device"], state["amp"]
    start, step, hist = time.perf_counter(), 0, []
    span = max(until - start, 1.0)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 29 + state["offset"])
    while time.perf_counter() < until:
        t, h, w, b = AE_SHAPES[step % len(AE_SHAPES)]
        b = max(1, b // args.batch_div)
        x = sampler.batch(b, t, (h, w))  # (B, 3, T, H, W) in [0, 1]
        if args.edit_share > 0:  # the denoiser's outputs are latents of edited clips: decode those too
            edited = torch.rand(b, device=x.device, generator=gen) < args.edit_share
            words = torch.multinomial(state["word_weights"], b, replacement=True, generator=gen)
            x = torch.where(edited.view(-1, 1, 1, 1, 1), apply_edits(x, words), x)
        x = x * 2 - 1  # in [-1, 1]
        for g in opt.param_groups:
            g["lr"] = lr_at((time.perf_counter() - start) / span, step, args.ae_lr)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            with torch.set_grad_enabled(not decoder_only):
                z = ae.encode(x)
            if step % 2:
                z = z + 0.05 * z.detach().std() * torch.randn_like(z)
            y = ae.decode(z)
        y = y.float()
        loss = F.mse_loss(y, x) + 0.1 * F.l1_loss(y, x) + 1e-5 * z.float().pow(2).mean()
        if anchor is not None:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                z0 = anchor.encode(x)
            drift = F.mse_loss(ae.normalize(z.float()), ae.normalize(z0.float()))
            loss = loss + args.anchor * drift
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            p = psnr(y.detach(), x)
            hist.append({"step": step, "loss": round(loss.item(), 5), "psnr": round(p, 2)})
            if anchor is not None:
                hist[-1]["drift"] = round(drift.item(), 5)
            if step % 200 == 0:
                log_line(state, f"ae step {step} loss {loss.item():.4f} train psnr {p:.2f}"
                                + (f" latent drift {drift.item():.5f}" if anchor is not None else ""))
    state["log"]["decoder" if decoder_only else "ae"] = log = {
        "steps": step, "seconds": round(time.perf_counter() - start, 1), "history": hist, "lr": args.ae_lr,
        "anchor": args.anchor if anchor is not None else 0,
        **({"holdout_psnr_before": before, "gray_round_trip_chroma_before": gray_before} if decoder_only else {})}
    ae.eval().requires_grad_(False)
    if not decoder_only and anchor is None:  # an anchored fine-tune keeps the old normalisation
        latent_stats(model, sampler, state)
    log["holdout_psnr"] = holdout_psnr(model, state, held_out)
    log["gray_round_trip_chroma"] = gray_round_trip(model, held_out)
    log_line(state, f"{'decoder' if decoder_only else 'ae'} done: {step} steps, held-out PSNR {log['holdout_psnr']}, "
                    f"gray round-trip chroma {log['gray_round_trip_chroma']}")


@torch.no_grad()
def latent_stats(model, sampler, state):
    zs = []
    for _ in range(16 if state["device"].type == "cuda" else 2):
        x = sampler.batch(8, 17, (96, 96)) * 2 - 1
        with torch.autocast(state["device"].type, dtype=torch.bfloat16, enabled=state["amp"]):
            zs.append(model.ae.encode(x).float())
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # (16, N)
    model.ae.latents_mean.copy_(z.mean(1))
    model.ae.latents_std.copy_(z.std(1).clamp_min(1e-3))
    state["log"]["latent_std"] = [round(v, 4) for v in z.std(1).tolist()]


@torch.no_grad()
def holdout_psnr(model, state, clips) -> dict:
    from lipcodec.models import to_video_tensor

    out = {}
    for name, frames in clips.items():
        x = to_video_tensor(frames, state["device"])
        y = model.ae.decode(model.ae.encode(x))
        out[name] = round(psnr(y, x), 2)
    return out


# -- the denoiser ----------------------------------------------------------------------------------------
class MaskedSelfAttention:
    """attn1 processor: the default Wan processor with ``holder.mask`` as attention mask."""

    def __init__(self, inner, holder):
        self.inner, self.holder = inner, holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.holder.mask, rotary_emb)


DIT_SHAPES = [(17, 128, 128, 24), (9, 128, 128, 32), (17, 96, 128, 24), (25, 96, 96, 24), (17, 64, 64, 32),
              (33, 64, 96, 24)]
CAUSAL_SHAPES = [(33, 96, 96, 24), (33, 64, 128, 24), (33, 128, 128, 12)]


def train_dit(model, sampler, args, state, until: float):
    tr = model.transformer.train().requires_grad_(True)
    model.embeddings.requires_grad_(True)
    holder = type("Holder", (), {"mask": None})()
    for block in tr.blocks:
        block.attn1.set_processor(MaskedSelfAttention(block.attn1.processor, holder))
    params = list(tr.parameters()) + [model.embeddings]
    opt = torch.optim.AdamW(params, lr=args.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    dev, amp = state["device"], state["amp"]
    vocab = len(model.vocabulary)
    start, step, hist = time.perf_counter(), 0, []
    span = max(until - start, 1.0)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 17 + state["offset"])
    while time.perf_counter() < until:
        causal = step % 3 == 2
        if causal:
            t, h, w, b = CAUSAL_SHAPES[(step // 3) % len(CAUSAL_SHAPES)]
        else:
            t, h, w, b = DIT_SHAPES[(step // 3 * 2 + step % 3) % len(DIT_SHAPES)]
        b = max(1, b // args.batch_div)
        x = sampler.batch(b, t, (h, w))  # (B, 3, T, H, W) in [0, 1]
        words = torch.multinomial(state["word_weights"], b, replacement=True, generator=gen)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            z = model.ae.normalize(model.ae.encode(torch.cat([x, apply_edits(x, words)]) * 2 - 1).float())
        z_src, z_edit = z[:b], z[b:]  # (B, 16, F, h, w)
        drop = torch.rand(b, device=dev, generator=gen) < 0.1
        emb = model.embeddings[torch.where(drop, vocab, words)]  # (B, L, D)
        s0 = torch.where(torch.rand(b, device=dev, generator=gen) < args.generation_share, torch.ones(b, device=dev),
                         0.3 + 0.7 * torch.rand(b, device=dev, generator=gen))
        sigma = (s0 * torch.rand(b, device=dev, generator=gen)).clamp_min(0.005)
        eps = torch.randn(z_src.shape, device=dev, generator=gen)
        view = (-1, 1, 1, 1, 1)
        x_start = (1 - s0.view(view)) * z_src + s0.view(view) * eps
        r = (sigma / s0).view(view)
        x_sig = (1 - r) * z_edit + r * x_start
        target = (x_start - z_edit) / s0.view(view)
        frames, th, tw = z_src.shape[2], z_src.shape[3] // 2, z_src.shape[4] // 2
        if causal:  # last chunk noisy, earlier chunks clean; block-causal attention
            c = int(torch.randint(frames // CHUNK, (), device=dev, generator=gen))
            n = CHUNK * (c + 1)
            x_in = torch.cat([z_edit[:, :, : CHUNK * c], x_sig[:, :, CHUNK * c : n]], 2)
            frame_sigma = torch.zeros(b, n, device=dev)
            frame_sigma[:, CHUNK * c :] = sigma[:, None]
            timestep = (1000 * frame_sigma).repeat_interleave(th * tw, 1)  # (B, S)
            chunk_of = (torch.arange(n, device=dev) // CHUNK).repeat_interleave(th * tw)  # (S,)
            holder.mask = (chunk_of[:, None] >= chunk_of[None, :])[None, None]  # (1, 1, S, S)
            target = target[:, :, CHUNK * c : n]
        else:
            n, c = frames, 0
            x_in, timestep = x_sig, 1000 * sigma
            holder.mask = None
        for g in opt.param_groups:
            g["lr"] = lr_at((time.perf_counter() - start) / span, step, args.dit_lr)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            pred = tr(x_in, timestep, emb, return_dict=False)[0]
        pred = pred.float()[:, :, CHUNK * c : n] if causal else pred.float()
        per = (pred - target).pow(2).mean((1, 2, 3, 4))
        loss = (per * s0.pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        step += 1
        if step % 50 == 0:
            hist.append({"step": step, "loss": round(loss.item(), 5), "causal": causal})
            if step % 150 == 0:
                log_line(state, f"dit step {step} loss {loss.item():.4f} ({'causal' if causal else 'full'})")
    holder.mask = None
    for block in tr.blocks:
        block.attn1.set_processor(block.attn1.processor.inner)
    with torch.no_grad():
        state["raw_dit"] = {k: v.detach().clone() for k, v in tr.state_dict().items()}
        state["raw_emb"] = model.embeddings.detach().clone()
        for p, e in zip(params, ema):
            p.copy_(e)
    tr.eval().requires_grad_(False)
    model.embeddings.requires_grad_(False)
    state["log"]["dit"] = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "history": hist,
                           "lr": args.dit_lr, "ema": args.ema}
    log_line(state, f"dit done: {step} steps")


# -- files ----------------------------------------------------------------------------------------------
def save_all(model, out: Path, state, final: bool):
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.float().cpu() for k, v in model.ae.state_dict().items()}, out / "ae.pt")
    dit = {f"transformer.{k}": v.float().cpu() for k, v in model.transformer.state_dict().items()}
    dit["embeddings"] = model.embeddings.detach().float().cpu()
    torch.save(dit, out / "dit.pt")  # EMA weights
    model.save(out / "reference.safetensors", metadata={"training": provenance(state["log"])})
    (out / "log.json").write_text(json.dumps(state["log"], indent=1))


def provenance(log: dict) -> dict:
    """What the weights' metadata keeps of a training log: all of it but the per-step
    histories (log.json has those), including the ``previous`` runs it resumed from."""
    return {k: {kk: vv for kk, vv in v.items() if kk != "history"} if isinstance(v, dict) else v for k, v in log.items()}


def load_resume(model, folder: Path):
    """Continue from a previous --out folder (ae.pt, dit.pt) or from a reference .safetensors
    file (e.g. the shipped weights: float16 copies of the same AE and EMA denoiser)."""
    if folder.suffix == ".safetensors":
        from safetensors import safe_open

        model.load_state_dict(Reference.load(folder).state_dict())
        with safe_open(str(folder), "pt") as f:
            return json.loads(f.metadata().get("training", "{}"))
    if (folder / "ae.pt").is_file():
        model.ae.load_state_dict(torch.load(folder / "ae.pt", map_location="cpu"))
    if (folder / "dit.pt").is_file():
        dit = torch.load(folder / "dit.pt", map_location="cpu")
        model.embeddings.data.copy_(dit.pop("embeddings"))
        model.transformer.load_state_dict({k.removeprefix("transformer."): v for k, v in dit.items()})
    prev = folder / "log.json"
    return json.loads(prev.read_text()) if prev.is_file() else {}


def parse_word_weights(text: str, vocabulary) -> torch.Tensor:
    """``negative=3,grayscale=2`` -> sampling weights over the vocabulary (unnamed words 1)."""
    weights = dict.fromkeys(vocabulary, 1.0)
    for item in filter(None, text.split(",")):
        word, _, value = item.partition("=")
        if word not in weights or not value:
            raise SystemExit(f"--word-weights {item!r}: use word=weight with a word from {', '.join(vocabulary)}")
        weights[word] = float(value)
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise SystemExit(f"--word-weights {text!r}: weights must be >= 0 and not all zero")
    return torch.tensor(list(weights.values()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("ae", "dit", "both", "decoder"), default="both",
                   help="decoder: fine-tune the decoder alone (frozen encoder, the denoiser stays valid)")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget, data loading included")
    p.add_argument("--ae-share", type=float, default=0.4, help="share of the budget for the autoencoder (both)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", type=Path, default=None, help="a previous --out folder (ae.pt, dit.pt) or a reference .safetensors file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ae-lr", type=float, default=1e-3)
    p.add_argument("--dit-lr", type=float, default=4e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--generation-share", type=float, default=0.33,
                   help="share of denoiser samples that start from pure noise (s0 = 1); the rest start at U[0.3, 1]")
    p.add_argument("--word-weights", default="",
                   help="word sampling weights (denoiser, --edit-share), e.g. negative=3,grayscale=2 (unnamed words 1)")
    p.add_argument("--anchor", type=float, default=0.0,
                   help="autoencoder fine-tune (--stage ae/both with --resume): weight of a penalty on the "
                        "normalised latents' drift from the resumed encoder's, so the denoiser stays valid")
    p.add_argument("--edit-share", type=float, default=0.0,
                   help="autoencoder/decoder: share of clips replaced by an edited version (a random word)")
    p.add_argument("--small", action="store_true", help="CPU smoke test: small batches, no real clips")
    args = p.parse_args(argv)
    if args.anchor and (args.resume is None or args.stage not in ("ae", "both")):
        raise SystemExit(f"--anchor {args.anchor} holds a resumed encoder's latents: it needs --resume and "
                         f"--stage ae or both (got --stage {args.stage}, --resume {args.resume})")
    word_weights = parse_word_weights(args.word_weights, VOCABULARY)
    args.batch_div = 8 if args.small else 1

    t0 = time.perf_counter()
    deadline = t0 + args.minutes * 60 - 15  # keep 15 s for the final save
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    state = {"t0": t0, "device": dev, "amp": dev.type == "cuda", "offset": 0, "word_weights": word_weights.to(dev),
             "log": {"args": {k: str(v) for k, v in vars(args).items()},
                     "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__}}
    model = Reference.build(CONFIG, seed=args.seed)
    if args.resume is not None:
        prev = provenance(load_resume(model, args.resume))
        state["log"]["previous"] = prev  # the chain of runs these weights come from
        state["offset"] = 1000 + int(prev.get("dit", {}).get("steps", 0))
    model.to(dev)
    sampler = ClipSampler(dev, seed=args.seed + state["offset"], videos=not args.small,
                          log=lambda s: log_line(state, s))
    log_line(state, f"model: transformer {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f} M, "
                    f"autoencoder {sum(p.numel() for p in model.ae.parameters()) / 1e6:.2f} M")
    if args.stage in ("ae", "both"):
        ae_until = t0 + (deadline - t0) * (args.ae_share if args.stage == "both" else 1.0)
        train_ae(model, sampler, args, state, ae_until)
        save_all(model, args.out, state, final=args.stage == "ae")
    elif args.resume is None:
        raise SystemExit(f"--stage {args.stage} needs --resume (a previous --out folder or a reference .safetensors)")
    if args.stage == "decoder":
        train_ae(model, sampler, args, state, deadline, decoder_only=True)
    if args.stage in ("dit", "both"):
        model.ae.eval().requires_grad_(False)
        try:
            train_dit(model, sampler, args, state, deadline)
        except Exception as error:  # keep what was trained so far
            import traceback

            traceback.print_exc()
            state["log"]["dit_error"] = repr(error)
    state["log"]["seconds"] = round(time.perf_counter() - t0, 1)
    save_all(model, args.out, state, final=True)
    log_line(state, f"wrote {args.out}")


if __name__ == "__main__":
    main()
