#!/usr/bin/env python3
"""W5: a PyTorch port of `elbo bench unet` (crates/elbo-cli/src/bench/unet.rs).

The network is elbo's U-Net (crates/elbo/src/nn/unet/{mod.rs,blocks.rs}) layer for layer, in
PyTorch's usual NCHW layout (`--channels-last` for torch.channels_last):
  temb = SiLU(Linear(E, E)(SiLU(Linear(base, E)(sinusoidal(time_scale * t)[base]))))
  stem 3x3 conv -> down path (num_res_blocks ResBlocks per level, attention at attn_levels,
  a 3x3 stride-2 conv between levels) -> middle (ResBlock, attention, ResBlock) -> up path
  (num_res_blocks + 1 ResBlocks per level on [h ; skip], nearest x2 + 3x3 conv between levels)
  -> GroupNorm + SiLU + 3x3 conv.
  ResBlock: skip(x) + conv2(drop(SiLU(GN2(conv1(SiLU(GN1(x))) + Linear(temb))))), skip a 1x1
  conv when the channels change. Attention: x + proj(MHA(GN(x))) with 1x1 convs for qkv, proj.
  zero_init: conv2, proj and the head start at zero. GroupNorm eps 1e-5.
A step is elbo's: a fixed batch x ~ N(0, 1) of [B, 1, H, W] images and t ~ U(0, 1), forward
with dropout (0 in every preset), loss = mean((net(x, t) - x)^2), backward, AdamW (lr 1e-4,
betas (0.9, 0.999), eps 1e-8, weight decay 0.01). The same number of plain forward passes
(no autograd) is timed first. One JSON line per preset, the keys of elbo's.

The parameter count of every preset is asserted against elbo's (EXPECTED_PARAMS, printed by
`elbo bench unet` as "params" and checked by its unit test `param_counts_match_the_torch_port`).
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# elbo::nn::UNetConfig presets: (base, channel_mults, num_res_blocks, attn_levels, mid_attn,
# attn_heads, dropout, time_embed_dim, time_scale, groups, zero_init), with (batch, side).
BASE = dict(in_channels=1, out_channels=1, base=32, mults=(1, 2), num_res_blocks=1,
            attn_levels=(1,), mid_attn=True, heads=1, dropout=0.0, temb=128,
            time_scale=1000.0, groups=8, zero_init=True)
PRESETS = {
    "digits": (dict(BASE), 128, 8),
    "digits_small": (dict(BASE, base=16, temb=64), 128, 8),
    "mnist": (dict(BASE, mults=(1, 2, 2), attn_levels=()), 64, 28),
    "mnist_small": (dict(BASE, mults=(1, 2, 2), attn_levels=(), base=16, temb=64), 64, 28),
}
# the "params" of `elbo bench unet`, preset by preset
EXPECTED_PARAMS = {"digits": 701_345, "digits_small": 176_849, "mnist": 1_062_497,
                   "mnist_small": 267_313}


def emit(**kw):
    kw.setdefault("framework", "torch")
    kw.setdefault("torch_version", torch.__version__)
    kw.setdefault("threads", torch.get_num_threads())
    print(json.dumps(kw), flush=True)


def summarize(times):
    times = sorted(times)
    n = len(times)
    return dict(median_ms=1e3 * statistics.median(times), mean_ms=1e3 * statistics.fmean(times),
                min_ms=1e3 * times[0], p90_ms=1e3 * times[min(n - 1, int(0.9 * n))], n=n)


def time_steps(step, warmup, iters):
    for _ in range(warmup):
        step()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return ts


def sinusoidal(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(a), torch.cos(a)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_(m):
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    return m


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb, groups, zero, dropout):
        super().__init__()
        self.gn1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.gn2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if zero:
            zero_(self.conv2)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.dropout = dropout

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.gn1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = F.dropout(F.silu(self.gn2(h)), self.dropout, self.training)
        h = self.conv2(h)
        return (x if self.skip is None else self.skip(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, c, heads, groups, zero):
        super().__init__()
        self.gn = nn.GroupNorm(groups, c, eps=1e-5)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        if zero:
            zero_(self.proj)
        self.heads = heads

    def forward(self, x, temb=None):
        B, C, H, W = x.shape
        nh, dh, L = self.heads, C // self.heads, H * W
        # channel = s C + head dh + j, as elbo's [B, H, W, 3, nh, dh]
        qkv = self.qkv(self.gn(x)).reshape(B, 3, nh, dh, L).permute(1, 0, 2, 4, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, nh, L, dh]
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))
        y = torch.softmax(s, dim=-1) @ v  # [B, nh, L, dh]
        y = y.permute(0, 1, 3, 2).reshape(B, C, H, W)
        return x + self.proj(y)


class Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, temb=None):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, temb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = c = cfg
        base, e, g, z, p = c["base"], c["temb"], c["groups"], c["zero_init"], c["dropout"]
        self.temb0 = nn.Linear(base, e)
        self.temb1 = nn.Linear(e, e)
        self.stem = nn.Conv2d(c["in_channels"], base, 3, padding=1)
        levels = len(c["mults"])
        ch, skips = base, [base]
        self.down = nn.ModuleList()
        for lvl, m in enumerate(c["mults"]):
            for _ in range(c["num_res_blocks"]):
                group = [ResBlock(ch, m * base, e, g, z, p)]
                ch = m * base
                if lvl in c["attn_levels"]:
                    group.append(AttnBlock(ch, c["heads"], g, z))
                self.down.append(nn.ModuleList(group))
                skips.append(ch)
            if lvl + 1 < levels:
                self.down.append(nn.ModuleList([Down(ch)]))
                skips.append(ch)
        mid = [ResBlock(ch, ch, e, g, z, p)]
        if c["mid_attn"]:
            mid.append(AttnBlock(ch, c["heads"], g, z))
        mid.append(ResBlock(ch, ch, e, g, z, p))
        self.mid = nn.ModuleList(mid)
        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(c["mults"]))):
            for i in range(c["num_res_blocks"] + 1):
                group = [ResBlock(ch + skips.pop(), m * base, e, g, z, p)]
                ch = m * base
                if lvl in c["attn_levels"]:
                    group.append(AttnBlock(ch, c["heads"], g, z))
                if lvl > 0 and i == c["num_res_blocks"]:
                    group.append(Up(ch))
                self.up.append(nn.ModuleList(group))
        self.out_norm = nn.GroupNorm(g, ch, eps=1e-5)
        self.out_conv = nn.Conv2d(ch, c["out_channels"], 3, padding=1)
        if z:
            zero_(self.out_conv)

    def forward(self, x, t):
        m = 1 << (len(self.cfg["mults"]) - 1)
        assert x.shape[2] % m == 0 and x.shape[3] % m == 0, "sizes must be multiples of 2^(levels-1)"
        s = sinusoidal(t.float() * self.cfg["time_scale"], self.cfg["base"])
        temb = F.silu(self.temb1(F.silu(self.temb0(s))))
        h = self.stem(x)
        skips = [h]
        for group in self.down:
            for layer in group:
                h = layer(h, temb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, temb)
        for group in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in group:
                h = layer(h, temb)
        return self.out_conv(F.silu(self.out_norm(h)))


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def read_safetensors(path):
    """{name: float32 tensor} of a safetensors file (F32 and U32 entries only)."""
    import numpy as np
    with open(path, "rb") as fh:
        raw = fh.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        dt = {"F32": np.float32, "U32": np.uint32}[v["dtype"]]
        arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt).reshape(v["shape"])
        out[k] = torch.from_numpy(arr.astype(np.float32))
    return out


def torch_name(elbo_name):
    """elbo's parameter name -> this port's: temb.0 -> temb0, down.i.res/attn/down ->
    down.i.{0,1}, mid.j -> mid.j, up.i.res/attn/up -> up.i.{0,1,2}."""
    parts = elbo_name.split(".")
    if parts[0] == "temb":
        return f"temb{parts[1]}." + ".".join(parts[2:])
    return ".".join(parts)


def check(name, path):
    """Loads elbo's weights, input and output of `name` from `path` (`elbo bench unet --export`)
    into this port and compares the outputs."""
    cfg, _, _ = PRESETS[name]
    net = UNet(cfg).eval()
    f = read_safetensors(path)
    # position of each layer in its group, by the kind of layer, to map res/attn/down/up
    mods = dict(net.named_modules())
    state = {}
    for k, w in f.items():
        if not k.startswith("param."):
            continue
        parts = k[len("param."):].split(".")
        if parts[0] in ("down", "up"):
            group = mods[f"{parts[0]}.{parts[1]}"]
            kinds = {"res": ResBlock, "attn": AttnBlock, "down": Down, "up": Up}[parts[2]]
            j = next(i for i, m in enumerate(group) if isinstance(m, kinds))
            parts = parts[:2] + [str(j)] + parts[3:]
        tname = torch_name(".".join(parts))
        p = dict(net.named_parameters())[tname]
        if p.dim() == 4:  # elbo's conv weight [out, k k in], columns (ky, kx, c)
            o, i, kh, kw = p.shape
            w = w.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
        state[tname] = w.reshape(p.shape)
    missing = set(dict(net.named_parameters())) - set(state)
    if missing:
        sys.exit(f"{name}: no weights for {sorted(missing)}")
    net.load_state_dict(state)
    with torch.inference_mode():
        y = net(f["x"], f["t"])
    err = (y - f["y"]).abs().max().item()
    scale = f["y"].abs().max().item()
    print(json.dumps(dict(check="unet_port", preset=name, params=nparams(net),
                          max_abs_diff=err, max_abs_output=scale)), flush=True)
    if not err <= 1e-4 * max(1.0, scale):
        sys.exit(f"{name}: the port's output differs from elbo's by {err} (outputs up to {scale})")


def run(name, args):
    cfg, B, hw = PRESETS[name]
    torch.manual_seed(40)
    net = UNet(cfg)
    n = nparams(net)
    if n != EXPECTED_PARAMS[name]:
        sys.exit(f"{name}: {n} parameters, elbo has {EXPECTED_PARAMS[name]}")
    g = torch.Generator().manual_seed(41)
    x = torch.randn(B, 1, hw, hw, generator=g)
    t = torch.rand(B, generator=g)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    steps = (args.warmup or 1, args.iters or 5)

    def fwd():
        with torch.inference_mode():
            net(x, t)

    net.eval()
    tf = time_steps(fwd, *steps)
    net.train()
    losses = []

    def step():
        loss = F.mse_loss(net(x, t), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    ts = time_steps(step, *steps)
    emit(bench="unet_train", preset=name, params=n, params_elbo=EXPECTED_PARAMS[name], batch=B,
         image=[1, hw, hw], **summarize(ts), forward_median_ms=summarize(tf)["median_ms"],
         loss_last=losses[-1], channels_last=args.channels_last)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="all", help=f"one of {', '.join(PRESETS)} or all")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channels-last", action="store_true", help="torch.channels_last tensors")
    p.add_argument("--check", metavar="DIR", help="time nothing; compare the port's output with "
                   "elbo's, from DIR/unet_PRESET.safetensors of `elbo bench unet --export DIR`")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    for name in names:
        if name not in PRESETS:
            sys.exit(f"unknown preset '{name}'; one of {', '.join(PRESETS)} or all")
        if args.check:
            check(name, f"{args.check}/unet_{name}.safetensors")
        else:
            run(name, args)


if __name__ == "__main__":
    main()
