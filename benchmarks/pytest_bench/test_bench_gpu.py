"""GPU benchmarks as pytest-benchmark tests (CUDA-synchronised rounds, ``cuda_benchmark``): the op's
forward and forward + backward at the speed table's first shape and at a long one, for the
certified policy at tolerance 1e-4 and for fixed 30 steps, the decode step at B = 1 and 256, and the
peer (fla-core, 30 steps) where installed. Skipped without CUDA.

    pytest benchmarks/pytest_bench/test_bench_gpu.py --benchmark-json=gpu.json
    mesa guard --baseline OLD_gpu.json --bench gpu.json     # a median beyond time_ratio x OLD fails
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.bench_certificate import make_inputs
from benchmarks.bench_decode import inputs as decode_inputs
from mesa_stability.kernels import mesa_chunk, mesa_step

pytestmark = pytest.mark.gpu
SHAPES = [(4, 2048, 16, 128), (1, 32768, 16, 128)]
CONFIGS = {"tol1e-4": dict(steps=30, tol=1e-4), "30steps": dict(steps=30)}


def _peer():
    try:
        from fla.ops.mesa_net import chunk_mesa_net, mesa_net_decoding_one_step
    except ImportError:
        pytest.skip("fla-core is not installed")
    return chunk_mesa_net, mesa_net_decoding_one_step


def _fwd_bwd(fn, inp, e):
    leaves = [t.detach().requires_grad_() for t in inp]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(e.to(out.dtype))


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def shape_inputs(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    B, T, H, D = request.param
    return request.param, make_inputs(B, T, H, D), torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_ours(cuda_benchmark, shape_inputs, config, pass_):
    shape, inp, e = shape_inputs
    run = functools.partial(mesa_chunk, validate=False, check="warn", **CONFIGS[config])
    call = (lambda: _fwd_bwd(run, inp, e)) if pass_ == "fwd+bwd" else (lambda: run(*inp))
    with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
        cuda_benchmark(call, rounds=20 if shape[1] > 8192 else 50)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_peer(cuda_benchmark, shape_inputs, pass_):
    peer, _ = _peer()
    shape, inp, e = shape_inputs
    run = functools.partial(peer, max_CG_iteration=30)
    call = (lambda: _fwd_bwd(run, inp, e)) if pass_ == "fwd+bwd" else (lambda: run(*inp))
    call()  # the autotuning compile, outside the timed rounds
    with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
        cuda_benchmark(call, rounds=20 if shape[1] > 8192 else 50)


@pytest.mark.parametrize("B", [1, 256])
@pytest.mark.parametrize("impl", ["ours", "ours-no-value-check", "peer"])
def test_decode(cuda_benchmark, B, impl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q, k, v, g, beta, lam, state = decode_inputs(B, 16, 128, torch.Generator(device="cuda").manual_seed(0))
    if impl == "peer":
        _, step = _peer()
        hkv = state[1].transpose(-1, -2).contiguous()
        call = functools.partial(step, q, k, v, g, lam, beta, state[0], hkv, max_CG_iteration=30)
    else:
        call = functools.partial(mesa_step, q, k, v, g, beta, lam, state, validate=impl == "ours")
    call()
    cuda_benchmark(call, rounds=200, warmup=20)
