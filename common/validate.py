"""Input validation for kernel wrappers: a clear error that names the problem, never a crash.

A Triton kernel handed a CPU tensor on a GPU machine, a half-sized input, or a transposed view
does not complain: it reads the wrong memory or faults. Wrappers call `check_tensors` first.
"""

import torch

from .device import DEVICE, HAS_GPU, dtype_name


def check_tensors(*, same_shape: bool = True, same_dtype: bool = True, dtypes=None,
                  contiguous: bool = True, ndim: int | None = None, **tensors: torch.Tensor) -> None:
    """Validate the named tensors; raise TypeError / ValueError naming the bad one.

    check_tensors(x=x, y=y) checks: both are tensors on the device kernels run on, of one
    shape and dtype, contiguous. Relax with same_shape=False, contiguous=False, and so on;
    `dtypes` lists the dtypes the kernel supports.
    """
    items = list(tensors.items())
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != DEVICE.type:
            if HAS_GPU:
                raise ValueError(f"{name} must be on a CUDA device, got a {t.device.type} tensor with a "
                                 f"CUDA GPU present (move it with {name}.cuda())")
            raise ValueError(f"{name} is a {t.device.type} tensor, but this run uses Triton's CPU "
                             f"interpreter, which needs cpu tensors (use {name}.cpu())")
        if dtypes is not None and t.dtype not in dtypes:
            names = ", ".join(dtype_name(d) for d in dtypes)
            raise TypeError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; this kernel "
                            f"supports {names}")
        if ndim is not None and t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
        if contiguous and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape "
                             f"{tuple(t.shape)}); pass {name}.contiguous(), or use a kernel that "
                             f"takes strides")
    first_name, first = items[0]
    for name, t in items[1:]:
        if same_shape and t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has "
                             f"{tuple(first.shape)}; they must match")
        if same_dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')} but {first_name} "
                            f"has {str(first.dtype).removeprefix('torch.')}; convert one "
                            f"({name}.to({first_name}.dtype))")
