"""Memory of a benchmark point: the estimate that predicts an out-of-memory before building, the memory
available to a worker, the cap that makes an over-large run fail with an allocation error (not the
kernel's OOM killer), and what counts as an out-of-memory error."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from spielbench.benchmark.options import BenchmarkOptions, method_family
from spielbench.benchmark.sizes import ModelSize
from spielbench.methods import REGISTRY


def _dtype_bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def estimate_memory(size: ModelSize, method: str, options: BenchmarkOptions) -> dict[str, int]:
    """A coarse estimate [bytes] of what one (size, method) run needs, for the OOM prediction.

    Components: ``weights`` (fp32 or bf16; NF4 projections at 0.5 byte + 1/32 byte of scales per
    weight), ``trainable_state`` (parameters, gradients and AdamW moments: 16 bytes per trainable fp32
    parameter; SpIEL adds 4 bytes of index and 8 of fused-forward cache), ``activations`` (saved tensors of every block without
    checkpointing: ``tokens * (12*h + 5*ffn)`` elements per block, plus fp32 logits and their gradient),
    ``transient`` (a dense per-layer ``dW`` and weight copy), and ``total``. Conservative only in that
    it omits allocator overhead; a miss is caught at run time.
    """
    family = method_family(method)
    quantized = REGISTRY[method].quantized
    act_bytes = _dtype_bytes(options.dtype)
    n_params = size.num_parameters()
    linear = size.num_linear_parameters()
    if quantized:
        weights = int(linear * (0.5 + 1 / 32)) + (n_params - linear) * 4
    elif family == "full":
        weights = n_params * 4
    else:
        weights = n_params * _dtype_bytes(options.dtype)
    if family == "full":
        trainable = n_params * 12  # grads + two Adam moments (fp32)
    elif family == "floor":
        trainable = 0
    elif family == "spiel":  # + the fused forward's copy of η and W0[η] (8 bytes per entry)
        trainable = size.lora_parameters(options.rank) * 28
    elif family in ("lora", "shira"):
        trainable = size.lora_parameters(options.rank) * 20
    else:  # ia3
        trainable = size.num_hidden_layers * 4 * size.hidden_size * 16
    tokens = options.batch_size * options.seq_len
    per_block = tokens * (12 * size.hidden_size + 5 * size.intermediate_size) * act_bytes
    attn = options.batch_size * size.num_attention_heads * options.seq_len * options.seq_len * act_bytes
    activations = size.num_hidden_layers * (per_block + attn) + 3 * tokens * size.vocab_size * 4
    largest = max(i * o for _, i, o in size.linear_shapes())
    transient = 3 * largest * 4 + size.vocab_size * size.hidden_size * 4
    runtime = 400 * 2**20  # python + torch + libraries
    total = weights + trainable + activations + transient + runtime
    return {"weights": int(weights), "trainable_state": int(trainable), "activations": int(activations),
            "transient": int(transient), "runtime": runtime, "total": int(total)}


def available_memory_bytes(device: str) -> int:
    """Memory available to a new run [bytes]: free device memory on CUDA, ``psutil`` available RAM on CPU."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _vm_size_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cap_memory(device: str, limit: int) -> Optional[str]:
    """Cap this process to ``limit`` more bytes: CPU ``RLIMIT_AS`` above the current address-space size;
    CUDA the per-process memory fraction. Returns a description, or None where no cap is possible."""
    import torch

    if device.startswith("cuda"):
        dev = torch.device(device)
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), dev)
        return f"cuda memory fraction {min(1.0, limit / total):.4f}"
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    current = _vm_size_bytes()
    if current is None:
        return None
    cap = current + int(limit)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return f"RLIMIT_AS {cap} bytes (address space {current} + {int(limit)})"


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(s in msg for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                      "not enough memory", "failed to allocate"))
    return False
