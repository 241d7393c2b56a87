"""ANN-R50's 3x3 training convs (2x3x384x384 input, stride 8) on the CPU: oneDNN against Winograd.

For each "same" 3x3 conv of the network, the forward alone and a forward plus backward (input
and weight gradients) three ways: oneDNN channels-last (torch's own path), oneDNN with the
weight gradient as matrix products (``model.options.matmul_weight_grad`` alone), and Winograd
F(2x2, 3x3) (``annseg.layers.winograd``, what ``model.options.winograd_conv`` adds; convs
narrower than its ``MIN_CHANNELS`` stay with oneDNN, the last two rows show why). Best of 3
after one untimed run; the peak is the most tensor bytes alive during the forward plus backward.
The error columns: the output's largest difference from a float64 conv, relative to its
largest value.

    python benchmarks/conv-winograd/measure.py --threads 2 --out benchmarks/conv-winograd
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from annseg.bench.machine import LiveTensors, describe
from annseg.bench.runner import script_arguments, timed, write_script_results
from annseg.layers.conv_grad import _ConvMatmulWeightGrad
from annseg.layers.winograd import winograd_conv2d

# (C_in, C_out, dilation, size, where): each 3x3 "same" conv shape of ANN-R50 at 2x3x384x384.
SHAPES = [(2048, 512, 1, 48, "context conv"), (1024, 256, 1, 48, "auxiliary head"),
          (512, 512, 4, 48, "layer4, 3 convs"), (256, 256, 2, 48, "layer3, 6 convs"),
          (128, 128, 1, 48, "layer2, 3 convs (left to oneDNN)"), (64, 64, 1, 96, "layer1, 3 convs (left to oneDNN)")]


def best_ms(run) -> float:
    return min(timed(run, torch.device("cpu"), repeats=3, warmup=1))


def peak_mib(run) -> float:
    with LiveTensors() as live:
        run()
    return live.peak / 2**20


def main() -> None:
    args = script_arguments(__doc__, __file__)
    torch.manual_seed(0)
    rows = []
    for c_in, c_out, d, size, where in SHAPES:
        cl = torch.channels_last
        x = torch.randn(2, c_in, size, size).contiguous(memory_format=cl).requires_grad_()
        w = (torch.randn(c_out, c_in, 3, 3) / (9 * c_in) ** 0.5).contiguous(memory_format=cl).requires_grad_()
        g = torch.randn(2, c_out, size, size).contiguous(memory_format=cl)
        ways = {"onednn": lambda: F.conv2d(x, w, None, 1, d, d),
                "matmul_weight_grad": lambda: _ConvMatmulWeightGrad.apply(x, w, None, [1, 1], [d, d], [d, d], 1),
                "winograd": lambda: winograd_conv2d(x, w, None, d)}
        row = {"conv": f"{c_in}->{c_out} 3x3 d{d}, 2x{size}x{size}", "where": where}
        for name, conv in ways.items():
            def step(conv=conv):
                torch.autograd.grad(conv(), (x, w), g)

            with torch.no_grad():
                row[f"{name}_forward_ms"] = best_ms(conv)
            row[f"{name}_step_ms"] = best_ms(step)
            row[f"{name}_peak_mib"] = peak_mib(step)
        with torch.no_grad():
            exact = F.conv2d(x.double(), w.double(), None, 1, d, d)
            for name in ("onednn", "winograd"):
                row[f"{name}_error"] = float((ways[name]().double() - exact).abs().max() / exact.abs().max())
        rows.append(row)
        print(row, flush=True)
    machine = describe(torch.device("cpu"), args.threads)
    command = f"python benchmarks/conv-winograd/measure.py --threads {args.threads} --out {args.out}"
    lines = [f"One 3x3 conv, best of 3 (ms); forward + backward with input and weight gradients, and its peak "
             f"(MiB of tensors alive). Device: {machine['device_name']}, {args.threads} threads, torch {machine['torch']}.",
             "",
             "| conv | in ANN-R50 | forward: oneDNN / Winograd | fwd + bwd: oneDNN / matmul weight grad / Winograd "
             "| Winograd / matmul weight grad | peak: matmul weight grad / Winograd | error vs float64: oneDNN / Winograd |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['conv']} | {r['where']} | {r['onednn_forward_ms']:,.0f} / {r['winograd_forward_ms']:,.0f} | "
              f"{r['onednn_step_ms']:,.0f} / {r['matmul_weight_grad_step_ms']:,.0f} / {r['winograd_step_ms']:,.0f} | "
              f"{r['winograd_step_ms'] / r['matmul_weight_grad_step_ms']:.2f}x | "
              f"{r['matmul_weight_grad_peak_mib']:,.0f} / {r['winograd_peak_mib']:,.0f} | "
              f"{r['onednn_error']:.0e} / {r['winograd_error']:.0e} |" for r in rows]
    print(write_script_results(args.out, {"command": command, "machine": machine, "rows": rows}, lines))


if __name__ == "__main__":
    main()
