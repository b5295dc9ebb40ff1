"""sharpfused.integrations.lightning: Lightning steps equal the plain-PyTorch loop, bit for bit.

Every comparison runs the same tiny model (same init, same data order) once through a
``lightning.pytorch.Trainer`` and once through the plain loop of the optimizer's own API.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

import sharpfused  # noqa: E402
from sharpfused.integrations.lightning import (  # noqa: E402
    SAMLightningModule,
    SharpnessAwareChecks,
    SharpnessAwareLightningError,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
]

ROOT = Path(__file__).resolve().parent.parent
N, BATCH = 24, 8  # 3 batches per epoch


def make_net(dtype=torch.float64, bn=True):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 8)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(8))
    layers += [torch.nn.ReLU(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers).to(dtype)


def make_data(dtype=torch.float64, n=N):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loader(x, y, batch=BATCH):
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(**kw):
    kw.setdefault("max_epochs", 100)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("devices", 1)
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )


OPTS = {
    "sam-sgd": lambda p, **kw: sharpfused.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kw),
    "sam-adamw": lambda p, **kw: sharpfused.SAM(p, torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.01, **kw),
    "xsam2": lambda p, **kw: sharpfused.XSAM(p, torch.optim.SGD, rho=0.05, steps=2, lr=0.1, momentum=0.9, **kw),
    "xsam1": lambda p, **kw: sharpfused.XSAM(p, torch.optim.SGD, rho=0.05, steps=1, lr=0.1, momentum=0.9, **kw),
    "bsam": lambda p, **kw: sharpfused.BSAM(p, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "looksam": lambda p, **kw: sharpfused.LookSAM(p, torch.optim.SGD, rho=0.05, k=2, lr=0.1, momentum=0.9, **kw),
    "sampa": lambda p, **kw: sharpfused.SAMPa(p, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "friendly": lambda p, **kw: sharpfused.FriendlySAM(p, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "gsam": lambda p, **kw: sharpfused.GSAM(p, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "ssam": lambda p, **kw: sharpfused.SSAM(p, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "bisam": lambda p, **kw: sharpfused.BiSAM(p, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "asam": lambda p, **kw: sharpfused.SAM(p, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1, momentum=0.9, **kw),
    "esam": lambda p, **kw: sharpfused.ESAM(p, torch.optim.SGD, beta=0.5, seed=3, lr=0.1, momentum=0.9, **kw),
    "mesa": lambda p, **kw: sharpfused.MESA(p, torch.optim.SGD, decay=0.9, lr=0.1, momentum=0.9, **kw),
}


class Net(SAMLightningModule):
    def __init__(self, opt="sam-sgd", dtype=torch.float64, bn=True, sched=False, **opt_kw):
        super().__init__()
        self.net = make_net(dtype, bn)
        self.opt_name, self.opt_kw, self.sched = opt, opt_kw, sched
        self.first_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        if self.sam_first_pass:
            self.first_losses.append(loss.detach().float())
        return loss

    def configure_optimizers(self):
        opt = OPTS[self.opt_name](self.parameters(), **self.opt_kw)
        if not self.sched:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Outputs(pl.Callback):
    def __init__(self):
        self.losses, self.lrs, self.before_step = [], [], 0

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.before_step += 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().float())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def reference(opt_name, steps, dtype=torch.float64, bn=True, sched=False, accumulate=1, batch=BATCH,
              autocast=None, scaler=None, x=None, y=None, **opt_kw):
    """The plain loop: opt.step(closure) (step_accumulated when accumulating), bn_model=model."""
    net = make_net(dtype, bn)
    opt = OPTS[opt_name](net.parameters(), bn_model=net, **opt_kw)
    sch = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if sched else None
    if x is None:
        x, y = make_data(dtype)
    batches = list(loader(x, y, batch))
    losses, lrs = [], []
    i = 0
    ctx = (lambda: torch.autocast("cpu", dtype=autocast, cache_enabled=False)) if autocast else None
    for _ in range(steps):
        group = []
        for _k in range(accumulate):
            group.append(batches[i % len(batches)])
            i += 1
        if scaler is not None:  # the GradScaler loop of the README
            xb, yb = group[0]
            with ctx():
                loss = F.cross_entropy(net(xb), yb)
            scaler.scale(loss).backward()
            kw = {"grad_scaler": scaler} if isinstance(opt, sharpfused.FriendlySAM) else {}
            opt.first_step(zero_grad=True, **kw)
            with ctx():
                l2 = F.cross_entropy(net(xb), yb)
            scaler.scale(l2).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            losses.append(loss.detach().float())
        elif accumulate > 1:
            losses.append(opt.step_accumulated(lambda b: F.cross_entropy(net(b[0]), b[1]), group).float())
        else:
            xb, yb = group[0]

            def closure(xb=xb, yb=yb, **_):  # BiSAM passes perturbation=
                opt.zero_grad()
                if ctx:
                    with ctx():
                        loss = F.cross_entropy(net(xb), yb)
                else:
                    loss = F.cross_entropy(net(xb), yb)
                loss.backward()
                return loss

            out = opt.step(closure)
            losses.append(out.detach().float())
        if sch is not None:
            sch.step()
        lrs.append(opt.param_groups[0]["lr"])  # as on_train_batch_end sees it: after the scheduler's step
    return net, opt, losses, lrs


def assert_same(lnet, rnet):
    for (n, a), b in zip(lnet.state_dict().items(), rnet.state_dict().values()):
        assert torch.equal(a, b), n


def assert_same_state(lopt, ropt):
    def flat(sd, out):
        if isinstance(sd, dict):
            for k in sorted(sd, key=str):
                flat(sd[k], out)
        elif isinstance(sd, (list, tuple)):
            for v in sd:
                flat(v, out)
        elif isinstance(sd, torch.Tensor):
            out.append(sd)
        return out

    a, b = flat(lopt.state_dict(), []), flat(ropt.state_dict(), [])
    assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize(
    "name", ["sam-sgd", "sam-adamw", "asam", "gsam", "ssam", "bisam", "friendly", "xsam2", "bsam", "looksam", "sampa", "esam", "mesa"]
)
def test_automatic_equals_plain_loop(name):
    steps = 5
    sched = name == "sam-sgd"
    model, out = Net(name, sched=sched), Outputs()
    x, y = make_data()
    t = trainer(max_steps=steps, callbacks=[out])
    t.fit(model, loader(x, y))
    rnet, ropt, rlosses, rlrs = reference(name, steps, sched=sched)
    assert t.global_step == steps  # max_steps ends the run
    assert_same(model.net, rnet)
    assert_same_state(t.optimizers[0], ropt)
    bn = model.net[1]
    assert int(bn.num_batches_tracked) == steps  # BatchNorm advanced once per step
    # the step's output and the log are the first pass's (SAMPa: its first pass, at x~)
    assert torch.equal(torch.stack(out.losses), torch.stack(rlosses))
    assert len(model.first_losses) == steps
    assert torch.equal(torch.stack(model.first_losses), torch.stack(rlosses))
    assert out.lrs == rlrs  # the scheduler stepped once per optimizer step
    logged = t.callback_metrics["train_loss_step"]
    assert torch.equal(logged.float(), rlosses[-1])
    # once per step for the two-pass algorithms; per later pass for XSAM(steps=2) and BSAM; on
    # LookSAM's full steps only (3 of 5 with k=2); per pass of the plugin's closure for SAMPa; never for
    # MESA (its one pass is Lightning's first; the step completes in first_step, as LookSAM's reuse steps)
    expected = {"xsam2": 2 * steps, "bsam": 2 * steps, "looksam": 3, "sampa": 2 * steps + 1, "mesa": 0}.get(name, steps)
    assert out.before_step == expected


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = make_data()
    full = Net("looksam", sched=True)  # LookSAM: its step counter and g_v are optimizer state too
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(max_steps=6, callbacks=[ckpt], enable_checkpointing=True).fit(full, loader(x, y))
    path = tmp_path / "epoch=0-step=3.ckpt"
    assert path.exists()
    resumed = Net("looksam", sched=True)
    t2 = trainer(max_steps=6)
    t2.fit(resumed, loader(x, y), ckpt_path=str(path))
    assert t2.global_step == 6
    assert_same(resumed.net, full.net)
    assert_same_state(t2.optimizers[0], full.trainer.optimizers[0])
    assert t2.optimizers[0].param_groups[0]["lr"] == full.trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize("name", ["sam-sgd", "xsam2", "looksam"])
def test_accumulation_equals_large_batch(name):
    steps = 3
    x, y = make_data()
    model = Net(name)
    t = trainer(max_steps=steps, accumulate_grad_batches=2)
    t.fit(model, loader(x, y, batch=4))
    rnet, ropt, rlosses, _ = reference(name, steps, accumulate=2, batch=4)
    assert t.global_step == steps
    assert_same(model.net, rnet)
    assert_same_state(t.optimizers[0], ropt)
    assert int(model.net[1].num_batches_tracked) == 2 * steps  # pass 1 of each micro-batch, as step_accumulated


def test_accumulation_sampa_refused():
    x, y = make_data()
    with pytest.raises(SharpnessAwareLightningError, match="SAMPa with accumulate_grad_batches"):
        trainer(max_steps=2, accumulate_grad_batches=2).fit(Net("sampa"), loader(x, y, batch=4))


def test_gradient_clip_val_is_max_grad_norm():
    x, y = make_data()
    model = Net("sam-sgd")
    t = trainer(max_steps=4, gradient_clip_val=0.05)
    t.fit(model, loader(x, y))
    assert t.optimizers[0].max_grad_norm == 0.05
    rnet, ropt, _, _ = reference("sam-sgd", 4, max_grad_norm=0.05)
    assert_same(model.net, rnet)
    unclipped, _, _, _ = reference("sam-sgd", 4)
    assert not torch.equal(unclipped[0].weight, rnet[0].weight)  # the clip did something


def test_gradient_clip_refusals():
    x, y = make_data()
    with pytest.raises(SharpnessAwareLightningError, match="clips its update gradient by norm only"):
        trainer(max_steps=1, gradient_clip_val=1.0, gradient_clip_algorithm="value").fit(Net(), loader(x, y))
    with pytest.raises(SharpnessAwareLightningError, match="disagree"):
        trainer(max_steps=1, gradient_clip_val=1.0).fit(Net(max_grad_norm=2.0), loader(x, y))

    class OwnClip(Net):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            pass

    with pytest.raises(SharpnessAwareLightningError, match="overrides configure_gradient_clipping"):
        trainer(max_steps=1).fit(OwnClip(), loader(x, y))


def test_bf16_mixed_equals_autocast_loop():
    x, y = make_data(torch.float32)
    model = Net("sam-sgd", dtype=torch.float32)
    t = trainer(max_steps=4, precision="bf16-mixed")
    t.fit(model, loader(x, y))
    rnet, _, rlosses, _ = reference("sam-sgd", 4, dtype=torch.float32, autocast=torch.bfloat16)
    assert t.global_step == 4
    assert_same(model.net, rnet)
    assert torch.equal(torch.stack(model.first_losses), torch.stack(rlosses))


def fp16_trainer(**kw):
    # Trainer(precision="16-mixed", accelerator="cpu") turns into bf16-mixed; the plugin itself runs
    # fp16 autocast and a GradScaler on CPU (torch.amp.GradScaler("cpu")), the path a GPU takes
    return trainer(plugins=[MixedPrecision("16-mixed", "cpu")], **kw)


@pytest.mark.parametrize("name", ["sam-sgd", "sam-adamw", "gsam", "ssam", "bisam", "friendly", "xsam1"])
def test_fp16_mixed_equals_gradscaler_loop(name):
    x, y = make_data(torch.float32)
    x[9, 0] = 7e4  # batch 2 of each epoch overflows fp16 (> 65504): steps 2 and 5 are skipped, the scale backs off
    model = Net(name, dtype=torch.float32, bn=False, sched=True)
    out = Outputs()
    t = fp16_trainer(max_steps=5, gradient_clip_val=1.0, callbacks=[out])
    t.fit(model, loader(x, y))
    scaler = torch.amp.GradScaler("cpu")
    rnet, ropt, rlosses, rlrs = reference(name, 5, dtype=torch.float32, bn=False, sched=True,
                                          autocast=torch.float16, scaler=scaler, x=x, y=y, max_grad_norm=1.0)
    opt = t.optimizers[0]
    assert t.global_step == 5  # Lightning counts a step GradScaler skipped (as for any optimizer)
    assert int(opt.skipped_steps) == int(ropt.skipped_steps) == 2
    assert t.precision_plugin.scaler.get_scale() == scaler.get_scale() == 2.0**14
    assert_same(model.net, rnet)
    assert_same_state(opt, ropt)
    assert out.lrs == rlrs  # the scheduler steps on the skipped step too (Lightning's behaviour)


def test_fp16_mixed_accumulation_equals_gradscaler_loop():
    x, y = make_data(torch.float32)
    model = Net("sam-sgd", dtype=torch.float32, bn=False)
    t = fp16_trainer(max_steps=3, accumulate_grad_batches=2)
    t.fit(model, loader(x, y, batch=4))
    scaler = torch.amp.GradScaler("cpu")
    net = make_net(torch.float32, bn=False)
    opt = OPTS["sam-sgd"](net.parameters())
    batches = list(loader(x, y, batch=4))
    for s in range(3):
        group = batches[2 * s: 2 * s + 2]
        for p in range(2):
            for xb, yb in group:
                with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
                    loss = F.cross_entropy(net(xb), yb)
                scaler.scale(loss / 2).backward()
            if p == 0:
                opt.first_step(zero_grad=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert t.global_step == 3
    assert_same(model.net, net)


@pytest.mark.parametrize("name", ["looksam", "xsam2", "bsam", "sampa"])
def test_fp16_mixed_refused_for_multi_pass(name):
    x, y = make_data(torch.float32)
    with pytest.raises(SharpnessAwareLightningError, match="precision='16-mixed'.*bf16-mixed"):
        fp16_trainer(max_steps=1).fit(Net(name, dtype=torch.float32), loader(x, y))


class Manual(SAMLightningModule):
    def __init__(self, opt="sam-sgd", dtype=torch.float64, split=False, **kw):
        super().__init__()
        self.automatic_optimization = False
        self.net = make_net(dtype, bn=True)
        self.opt_name, self.split, self.kw = opt, split, kw
        self.first_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.split:
            halves = [(x[:4], y[:4]), (x[4:], y[4:])]
            loss = self.sam_manual_step(lambda b: F.cross_entropy(self.net(b[0]), b[1]), micro_batches=halves)
        else:
            loss = self.sam_manual_step(lambda: F.cross_entropy(self.net(x), y))
        self.first_losses.append(loss.float())
        return loss

    def configure_optimizers(self):
        return OPTS[self.opt_name](self.parameters(), **self.kw)


@pytest.mark.parametrize("name", ["sam-sgd", "looksam", "bisam"])
def test_manual_helper_equals_plain_loop(name):
    x, y = make_data()
    model = Manual(name)
    t = trainer(max_steps=4)
    t.fit(model, loader(x, y))
    rnet, ropt, rlosses, _ = reference(name, 4)
    assert t.global_step == 4
    assert_same(model.net, rnet)
    assert torch.equal(torch.stack(model.first_losses), torch.stack(rlosses))
    assert int(model.net[1].num_batches_tracked) == 4


def test_manual_helper_micro_batches_equal_large_batch():
    x, y = make_data()
    model = Manual("sam-sgd", split=True)
    t = trainer(max_steps=3)
    t.fit(model, loader(x, y))
    rnet, _, _, _ = reference("sam-sgd", 3, accumulate=2, batch=4)  # the same 4-sample micro-batches
    assert t.global_step == 3
    assert_same(model.net, rnet)


def test_manual_helper_fp16_equals_gradscaler_loop():
    x, y = make_data(torch.float32)
    model = Manual("sam-sgd", dtype=torch.float32)
    t = fp16_trainer(max_steps=3)
    t.fit(model, loader(x, y))
    scaler = torch.amp.GradScaler("cpu")
    net = make_net(torch.float32)
    opt = OPTS["sam-sgd"](net.parameters(), bn_model=net)
    for xb, yb in list(loader(x, y))[:3]:
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            loss = F.cross_entropy(net(xb), yb)
        scaler.scale(loss).backward()
        opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            loss2 = F.cross_entropy(net(xb), yb)
        scaler.scale(loss2).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert t.global_step == 3
    assert_same(model.net, net)


class Plain(pl.LightningModule):
    def __init__(self, manual=False):
        super().__init__()
        self.automatic_optimization = not manual
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss)
        opt.first_step(zero_grad=True)  # the wrapper's protocol: Lightning does not count this step
        self.manual_backward(F.cross_entropy(self.net(x), y))
        opt.second_step(zero_grad=True)
        return loss

    def configure_optimizers(self):
        return OPTS["sam-sgd"](self.parameters())


def test_plain_module_refused_by_checks():
    x, y = make_data()
    with pytest.raises(SharpnessAwareLightningError, match="not a sharpfused.integrations.lightning.SAMLightningModule"):
        trainer(max_steps=2, callbacks=[SharpnessAwareChecks()]).fit(Plain(), loader(x, y))
    with pytest.raises(SharpnessAwareLightningError, match="Lightning counted 0"):
        trainer(max_steps=2, callbacks=[SharpnessAwareChecks()]).fit(Plain(manual=True), loader(x, y))


def test_plain_module_refused_by_the_optimizer_without_the_callback():
    """No callback: a sharpfused optimizer stepped by Lightning's automatic optimization from a plain
    LightningModule refuses at the first step (silently wrong with accumulation before), naming the mixin."""
    x, y = make_data()
    model = Plain()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="derive it from sharpfused.integrations.lightning.SAMLightningModule"):
        trainer(max_steps=2, accumulate_grad_batches=2).fit(model, loader(x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_docs_snippet_runs():
    text = (ROOT / "docs" / "lightning.md").read_text()
    m = re.search(r"<!-- snippet: lightning -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/lightning.md has no '<!-- snippet: lightning -->' python block"
    ns = {"__name__": "snippet"}
    exec(compile(m.group(1), "docs/lightning.md", "exec"), ns)
    assert ns["trainer"].global_step == ns["trainer"].max_steps


def test_example_quick():
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["examples/lightning.py", "--quick"]
    try:
        runpy.run_path(str(ROOT / "examples" / "lightning.py"), run_name="__main__")
    finally:
        sys.argv = argv




def test_exception_in_a_later_pass_restores_the_weights():
    class Fails(Net):
        def training_step(self, batch, batch_idx):
            if self.global_step == 1 and not self.sam_first_pass:
                self.before = [p.detach().clone() for p in self.net.parameters()]
                raise ValueError("boom in pass 2")
            return super().training_step(batch, batch_idx)

    x, y = make_data()
    model = Fails("sam-sgd")
    with pytest.raises(ValueError, match="boom in pass 2"):
        trainer(max_steps=3).fit(model, loader(x, y))
    opt = model.trainer.optimizers[0]
    assert not opt.perturbed
    ref, _, _, _ = reference("sam-sgd", 1)  # the weights after step 1, not the perturbed ones of step 2
    assert all(torch.equal(a, b) for a, b in zip(model.net.parameters(), ref.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.net.parameters(), model.before))


def test_training_step_none_skips_the_step():
    class Skips(Net):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                return None
            return super().training_step(batch, batch_idx)

    x, y = make_data()
    model = Skips("sam-sgd")
    t = trainer(max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader(x, y))
    assert t.global_step == 3  # Lightning counts the step, as for any optimizer whose training_step returned None
    assert int(model.net[1].num_batches_tracked) == 2  # no forward in the skipped batch
    assert len(model.first_losses) == 2
    ref, _, _, _ = reference("sam-sgd", 1)
    assert not torch.equal(model.net[0].weight, ref[0].weight)  # steps 1 and 3 were taken


class DDPSpawnThatCloses(pl.strategies.DDPStrategy):
    """``ddp_spawn`` that destroys its gloo group at teardown. Lightning leaves the group alive until
    the worker process exits; gloo's worker threads then die during interpreter finalization, which
    aborts a rank now and then ("terminate called without an active exception", SIGABRT: one CI run
    of several). Nothing collective runs after ``teardown`` in a spawned fit."""

    def __init__(self):
        super().__init__(start_method="spawn")

    def teardown(self):
        super().teardown()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class SaveRank0(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, module):
        if trainer.global_rank == 0:
            torch.save({"w": [p.detach().clone() for p in module.net.parameters()], "steps": trainer.global_step},
                       self.path)


def test_ddp_accumulation_equals_large_batch(tmp_path):
    # two CPU processes (gloo): every pass's backward syncs through DDP, the micro-batch before the
    # last one runs under no_sync; the step equals SAM on the union of both ranks' 2 micro-batches
    x, y = make_data()
    path = tmp_path / "rank0.pt"
    t = trainer(max_steps=3, strategy=DDPSpawnThatCloses(), devices=2, accumulate_grad_batches=2, callbacks=[SaveRank0(path)])
    t.fit(Net("sam-sgd", bn=False), loader(x, y, batch=2))
    out = torch.load(path)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0)).tolist()  # DistributedSampler, epoch 0
    r0, r1 = perm[0::2], perm[1::2]
    order = [i for s in range(3) for i in r0[4 * s: 4 * s + 4] + r1[4 * s: 4 * s + 4]]
    rnet, _, _, _ = reference("sam-sgd", 3, bn=False, x=x[order], y=y[order])
    assert out["steps"] == 3
    for a, b in zip(out["w"], rnet.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)  # the all-reduce sums in another order


def test_scheduler_on_base_optimizer_is_refused_by_lightning():
    class OnBase(Net):
        def configure_optimizers(self):
            opt = OPTS["sam-sgd"](self.parameters())
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt.base_optimizer, 2)}

    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    x, y = make_data()
    with pytest.raises(MisconfigurationException, match="schedulers are attached with an optimizer"):
        trainer(max_steps=1).fit(OnBase(), loader(x, y))
