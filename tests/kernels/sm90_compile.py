"""Compile every kernel variant the launchers use for an sm_90 GPU (H100/H200), on the CPU.

Run without TRITON_INTERPRET: the launchers run on CPU tensors with `JITFunction.run`
replaced by a recorder, and each distinct (kernel, signature, constexprs) goes through
Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX, and ptxas to a cubin). The interpreter
runs kernels as NumPy and misses what only the compiler checks (types of loop-carried
values, constexpr branches, layouts); this catches it without a GPU.
Prints one line per kernel variant and "compiled N variants".
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}
recorded = {}


def record(self, *args, grid, warmup=False, **kwargs):
    bound = dict(zip(self.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for p in self.params:
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, int):
            signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[p.name] = "fp32"
    key = (self.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())))
    recorded[key] = (self, signature, constexprs)


JITFunction.run = record


def exercise():
    # One call per constexpr branch (activation, residual, affine, one or two launches,
    # memory saving, eval), not the full product.
    from batchnorm.kernels import backward as bw
    from batchnorm.kernels import forward as fw

    c = 6
    w, b = torch.randn(c), torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    x = torch.randn(8, c, 9, 9).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    for single in (True, False):
        fw.forward_train(x, w, b, x, 1e-5, "relu", 0.0, torch.float32, allow_single=single)
        fw.forward_train(x, None, b, None, 1e-5, "leaky_relu", 0.1, allow_single=single)
        bw.backward(
            x, x, x, x, rm, rv, w, b, 1e-5, "relu", 0.0, True, False,
            (True, True, True, True), allow_single=single,
        )  # fmt: skip
        # leaky_relu's mask from x + residual, then from z (memory saving)
        bw.backward(
            x, x, None, x, rm, rv, w, b, 1e-5, "leaky_relu", 0.1, True, False,
            (True, True, True, True), allow_single=single,
        )  # fmt: skip
        bw.backward(
            x, x, None, None, rm, rv, w, b, 1e-5, "leaky_relu", 0.1, True, True,
            (True, True, True, False), allow_single=single,
        )  # fmt: skip
    x = torch.randn(8, c)
    fw.forward_train(x, None, None, None, 1e-5, "identity", 0.0, allow_single=False)
    bw.backward(
        x, x, None, None, rm, rv, None, None, 1e-5, "identity", 0.0, True, False,
        (True, False, False, False), allow_single=False,
    )  # fmt: skip
    fw.forward_eval(x, w, b, x, rm, rv, 1e-5, "relu", 0.0)
    bw.backward(
        x, x, x, None, rm, rv, w, b, 1e-5, "relu", 0.0, False, False, (True, True, False, False)
    )


def main():
    exercise()
    target = GPUTarget("cuda", 90, 32)
    for fn, signature, constexprs in recorded.values():
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target)
        assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
        print(fn.__name__, len(compiled.asm["cubin"]), "bytes", file=sys.stderr)
    print(f"compiled {len(recorded)} variants")


if __name__ == "__main__":
    main()
