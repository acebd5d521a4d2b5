"""Whitening over the global batch with two REAL processes (torchrun, gloo, CPU).

Each rank embeds its half of a fixed batch, gathers the embeddings with `gather_with_grad`,
computes the objective on the global batch, back-propagates, and averages the parameter
gradients over ranks (what DDP does). That must equal one process computing the objective on
the whole batch: same loss, same gradients. Last, the shared atomic checkpoint save with two
processes, one of them slow.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import intl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_B, IN_DIM, OUT_DIM = 16, 12, 10

# (name, axis, number of views)
LOSS_CASES = [("axis0_v3", 0, 3), ("axis1_v2", 1, 2)]
# Every method's module, built from backbone b and projector p: its forward gathers internally.
MODULE_CASES = {
    "intl": "intl.INTL(b, p, intl.IterNorm(iters=4, axis=0))",
    "intl-m": "intl.INTL(b, p, intl.IterNorm(iters=4, axis=0), momentum_target=True)",
    "cw-rgp": "intl.SubBatchWhitening(b, p, intl.GroupWhitening(groups=2, axis=1), w_size=8)",
    # eps: 8 backbone features give a rank-8 10 x 10 covariance
    "wmse": "intl.SubBatchWhitening(b, p, intl.CholeskyWhitening(eps=0.1), w_size=16)",
}
# The sub-batch methods draw their partitions from the step (the same on every process); INTL takes views only.
STEP = {"cw-rgp": {"step": 7}, "wmse": {"step": 7}}

HELPER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    sys.path.insert(0, {root!r})
    import intl

    GLOBAL_B, IN_DIM, OUT_DIM = {global_b}, {in_dim}, {out_dim}
    LOSS_CASES = {loss_cases!r}
    MODULE_CASES = {module_cases!r}
    STEP = {step!r}


    def data(n_views):
        g = torch.Generator().manual_seed(123)
        base = torch.randn(GLOBAL_B, IN_DIM, generator=g, dtype=torch.float64)
        return [base + 0.5 * torch.randn(GLOBAL_B, IN_DIM, generator=g, dtype=torch.float64) for _ in range(n_views)]


    def average_grads(model, world):
        grads = {{name: p.grad for name, p in model.named_parameters() if p.grad is not None}}
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
        return {{name: grad.clone() for name, grad in grads.items()}}


    def main():
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        b = GLOBAL_B // world
        rows = slice(rank * b, (rank + 1) * b)
        results = {{"world": world}}

        for name, axis, n_views in LOSS_CASES:
            torch.manual_seed(0)
            model = nn.Linear(IN_DIM, OUT_DIM).double()
            views = data(n_views)
            z = [model(v[rows]) for v in views]
            loss = intl.intl_loss(z, iters=4, axis=axis)  # gathers the global batch
            loss.backward()
            losses = [torch.zeros(()) .double() for _ in range(world)]
            dist.all_gather(losses, loss.detach())
            with torch.no_grad():
                full = model(views[0])
            results[name] = {{
                "loss": loss.detach(),
                "losses": torch.stack(losses),
                "grads": average_grads(model, world),
                "gathered": intl.gather_with_grad(z[0]).detach(),
                "full_view0": full,
            }}

        for name, expression in MODULE_CASES.items():
            torch.manual_seed(0)
            b, p = nn.Sequential(nn.Flatten(), nn.Linear(IN_DIM, 8)), intl.build_projector(8, str(OUT_DIM))
            model = eval(expression, {{"intl": intl, "b": b, "p": p}}).double()
            views = [v.view(GLOBAL_B, 3, 2, 2) for v in data(3)]
            out = model([v[rows] for v in views], **STEP.get(name, {{}}))
            out["loss"].backward()
            results[name] = {{"loss": out["loss"].detach(), "grads": average_grads(model, world)}}

        if rank == 0:
            torch.save(results, sys.argv[1])
        dist.barrier()
        dist.destroy_process_group()


    if __name__ == "__main__":
        main()
    """
)


def data(n_views):
    g = torch.Generator().manual_seed(123)
    base = torch.randn(GLOBAL_B, IN_DIM, generator=g, dtype=torch.float64)
    return [base + 0.5 * torch.randn(GLOBAL_B, IN_DIM, generator=g, dtype=torch.float64) for _ in range(n_views)]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "helper.py"
    script.write_text(
        HELPER.format(root=ROOT, global_b=GLOBAL_B, in_dim=IN_DIM, out_dim=OUT_DIM, loss_cases=LOSS_CASES,
                      module_cases=MODULE_CASES, step=STEP)
    )
    out_file = tmp / "results.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out_file)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out_file, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("name,axis,n_views", LOSS_CASES)
def test_two_process_intl_loss_and_gradients_equal_single_process_on_global_batch(
    two_process_results, name, axis, n_views
):
    res = two_process_results[name]
    assert two_process_results["world"] == 2
    torch.manual_seed(0)
    model = nn.Linear(IN_DIM, OUT_DIM).double()
    views = data(n_views)
    loss = intl.intl_loss([model(v) for v in views], iters=4, axis=axis)
    loss.backward()
    # the gather returns the global batch in rank order
    torch.testing.assert_close(res["gathered"], res["full_view0"], rtol=1e-12, atol=1e-12)
    # every rank computes the same loss, equal to the single-process loss
    torch.testing.assert_close(res["losses"], loss.detach().expand(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
    for pname, p in model.named_parameters():
        torch.testing.assert_close(res["grads"][pname], p.grad, rtol=1e-5, atol=1e-5)
    # the distributed run really is the same computation, not just close: float64 agreement
    torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("method", MODULE_CASES)
def test_two_process_module_of_every_method_matches_single_process_loss_and_gradients(two_process_results, method):
    res = two_process_results[method]
    torch.manual_seed(0)
    b, p = nn.Sequential(nn.Flatten(), nn.Linear(IN_DIM, 8)), intl.build_projector(8, str(OUT_DIM))
    model = eval(MODULE_CASES[method], {"intl": intl, "b": b, "p": p}).double()
    views = [v.view(GLOBAL_B, 3, 2, 2) for v in data(3)]
    loss = model(views, **STEP.get(method, {}))["loss"]
    loss.backward()
    torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
    for pname, p in model.named_parameters():
        if p.grad is not None:  # the EMA target of intl-m has none
            torch.testing.assert_close(res["grads"][pname], p.grad, rtol=1e-5, atol=1e-5)
    assert sorted(res["grads"]) == sorted(n for n, p in model.named_parameters() if p.grad is not None)


def test_gather_with_grad_is_identity_without_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    z = torch.randn(4, 3, requires_grad=True)
    out = intl.gather_with_grad(z)
    assert out.shape == z.shape and torch.equal(out, z)
    g = torch.randn(4, 3)
    (out * g).sum().backward()
    assert torch.equal(z.grad, g)


SLOW_RANK_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    sys.path.insert(0, {root!r})
    import intl

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    save_state = accelerator.save_state
    def slow_save_state(folder):  # rank 1 writes its share of the checkpoint long after rank 0
        if accelerator.process_index == 1:
            time.sleep(2)
        save_state(folder)
    accelerator.save_state = slow_save_state
    for step in (1, 2):
        intl.save_state_atomically(accelerator, Path(sys.argv[1]) / f"step-{{step:04d}}", "trainer_state.json",
                                   {{"step": step}}, keep=1)
    """
)


@pytest.mark.slow
def test_atomic_checkpoint_holds_every_process_state_even_when_one_process_is_slow(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(SLOW_RANK_SAVE.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true",
               GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "checkpoints")]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    # only the newest checkpoint is kept, no temporary folder is left, and it has both processes' RNG states
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0002"]
    saved = {p.name for p in (tmp_path / "checkpoints" / "step-0002").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= saved
