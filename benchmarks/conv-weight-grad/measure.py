"""Weight gradient of ANN-R50's training convs (2x3x384x384 input, stride 8) three ways, on the CPU.

oneDNN's channels-last weight gradient, oneDNN's NCHW one on copies of the maps, and
annseg's matrix products of channels-last tokens (``annseg.layers.conv_grad.weight_grad``,
what ``model.options.matmul_weight_grad`` uses in training). Best of 3 after one untimed run.

    python benchmarks/conv-weight-grad/measure.py --threads 2 --out benchmarks/conv-weight-grad
"""

from __future__ import annotations

import time

import torch

from annseg.bench.machine import describe
from annseg.bench.runner import script_arguments, write_script_results
from annseg.layers.conv_grad import weight_grad

# (C_in, C_out, kernel, dilation, size): the context conv, the auxiliary head's conv, layer4/layer3 3x3s, 1x1s.
SHAPES = [(2048, 512, 3, 1, 48), (1024, 256, 3, 1, 48), (512, 512, 3, 4, 48), (256, 256, 3, 2, 48),
          (1024, 2048, 1, 1, 48), (2048, 512, 1, 1, 48), (512, 2048, 1, 1, 48)]


def best_ms(run, repeats: int = 3) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    args = script_arguments(__doc__, __file__)
    rows = []
    for c_in, c_out, k, d, size in SHAPES:
        cl = torch.channels_last
        x = torch.randn(2, c_in, size, size).contiguous(memory_format=cl)
        w = torch.randn(c_out, c_in, k, k).contiguous(memory_format=cl)
        g = torch.randn(2, c_out, size, size).contiguous(memory_format=cl)
        geometry = ([1, 1], [d * (k // 2)] * 2, [d, d])

        def onednn(x=x, w=w, g=g):
            return torch.ops.aten.convolution_backward(g, x, w, None, *geometry, False, [0, 0], 1,
                                                       [False, True, False])[1]

        nhwc = best_ms(onednn)
        nchw = best_ms(lambda: onednn(x.contiguous(), w.contiguous(), g.contiguous()))
        ours = best_ms(lambda: weight_grad(g, x, tuple(w.shape), *geometry))
        error = float((weight_grad(g, x, tuple(w.shape), *geometry) - onednn()).abs().max() / onednn().abs().max())
        rows.append({"conv": f"{c_in}->{c_out} {k}x{k} d{d}, 2x{size}x{size}", "onednn_nhwc_ms": nhwc,
                     "onednn_nchw_copies_ms": nchw, "matmul_taps_ms": ours, "relative_difference": error})
    machine = describe(torch.device("cpu"), args.threads)
    command = f"python benchmarks/conv-weight-grad/measure.py --threads {args.threads} --out {args.out}"
    lines = [f"Weight gradient of one conv, best of 3 (ms). Device: {machine['device_name']}, {args.threads} threads, "
             f"torch {machine['torch']}.", "",
             "| conv | oneDNN, NHWC | oneDNN, NCHW copies | matmul per tap (annseg) | relative difference |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['conv']} | {r['onednn_nhwc_ms']:,.0f} | {r['onednn_nchw_copies_ms']:,.0f} | "
              f"{r['matmul_taps_ms']:,.0f} | {r['relative_difference']:.0e} |" for r in rows]
    print(write_script_results(args.out, {"command": command, "machine": machine, "rows": rows}, lines))


if __name__ == "__main__":
    main()
