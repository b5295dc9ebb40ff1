"""SAMTrainer (sharpfused.integrations.huggingface) against the plain-PyTorch loop.

Every comparison uses the same initial weights and the same data order (sequential sampler) and,
where the model is the float64 MLP below, is bit for bit: the Trainer runs the same forward,
the same backward of the same scaled loss (x / 1 and x / 2 are exact), the same optimizer calls.
Two comparisons use a tolerance, and say why: gradient accumulation against the one large batch
(a sum of two half-means is not the mean's rounding), and the tiny GPT-2 (float32, its loss
upcasts to float32 anyway) with num_items_in_batch normalization.
"""

from __future__ import annotations

import math
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch.nn.functional as F  # noqa: E402

import sharpfused  # noqa: E402
from sharpfused.integrations.huggingface import SAMTrainer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIM, CLASSES, N = 6, 3, 16


class MLP(torch.nn.Module):
    """A tiny float64 classifier with the Trainer's calling convention (keyword inputs, a dict out)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = torch.nn.Linear(DIM, 8).double()
        self.l2 = torch.nn.Linear(8, CLASSES).double()

    def forward(self, features, labels=None):
        logits = self.l2(torch.tanh(self.l1(features)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def dataset(n: int = N, inf_at: int | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    if inf_at is not None:
        x[inf_at, 0] = math.inf
    return [{"features": x[i], "labels": y[i]} for i in range(n)]


def args(tmp_path, **kw) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        learning_rate=0.1,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def loss_fn(model, batch):
    return model(**batch)["loss"]


def batches(data: list[dict], size: int) -> list[dict]:
    return [
        {k: torch.stack([d[k] for d in data[i : i + size]]) for k in data[0]} for i in range(0, len(data), size)
    ]


def reference(make_opt, steps: int, bs: int, ga: int = 1, data=None, closure_kw=None, sched_fn=None):
    """The plain-PyTorch loop: step(closure) (step_accumulated with ga > 1) over the same batches."""
    model = MLP()
    opt = make_opt(model)
    sched = sched_fn(opt) if sched_fn else None
    mbs = batches(data or dataset(), bs)
    for s in range(steps):
        group = mbs[s * ga : (s + 1) * ga]
        if ga > 1:
            opt.step_accumulated(lambda b: loss_fn(model, b), group)
        elif closure_kw:
            opt.step(closure_kw(model, group[0]))
        else:
            def closure(b=group[0]):
                loss = loss_fn(model, b)
                loss.backward()
                return loss

            opt.step(closure)
        if sched is not None and not bool(opt.last_step_skipped):
            sched.step()
    return model, opt


def trained(tmp_path, make_opt, data=None, **kw):
    model = MLP()
    opt = make_opt(model)
    trainer = SAMTrainer(model=model, args=args(tmp_path, **kw), train_dataset=data or dataset(), optimizers=(opt, None))
    trainer.train()
    return model, opt, trainer


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


ALGOS = {
    "sam_sgd": lambda m: sharpfused.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "sam_adamw": lambda m: sharpfused.SAM(m.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, weight_decay=0.01),
    "looksam": lambda m: sharpfused.LookSAM(m.parameters(), torch.optim.SGD, rho=0.05, k=2, lr=0.1),
    "xsam2": lambda m: sharpfused.XSAM(m.parameters(), torch.optim.SGD, rho=0.05, steps=2, lr=0.1),
    "bsam": lambda m: sharpfused.BSAM(m.parameters(), torch.optim.SGD, lr=0.1),
    "gsam": lambda m: sharpfused.GSAM(m.parameters(), torch.optim.SGD, rho_max=0.05, alpha=0.4, lr=0.1),
    "sampa": lambda m: sharpfused.SAMPa(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1),
    "esam": lambda m: sharpfused.ESAM(m.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, seed=3, lr=0.1),
    "mesa": lambda m: sharpfused.MESA(m.parameters(), torch.optim.SGD, decay=0.9, lr=0.1),
}


@pytest.mark.parametrize("name", list(ALGOS))
def test_matches_plain_loop_bitwise(tmp_path, name):
    model, opt, trainer = trained(tmp_path, ALGOS[name])
    ref, ref_opt = reference(ALGOS[name], steps=4, bs=4)
    assert same(model, ref), name
    assert trainer.state.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    norms = [("grad_norm" in h) for h in trainer.state.log_history if "loss" in h]
    if name == "looksam":
        assert opt.state["looksam"]["step"] == 4  # 2 full + 2 reuse steps ran
        assert norms == [True, False, True, False]  # no gradient left to measure after a reuse step
    elif name == "mesa":
        assert norms == [False] * 4  # one pass, the step completed inside it: no gradient left to measure
    else:
        assert norms == [name != "sampa"] * 4


def test_logged_loss_is_first_pass(tmp_path):
    model, opt, trainer = trained(tmp_path, ALGOS["sam_sgd"], max_steps=1)
    first = loss_fn(MLP(), batches(dataset(), 4)[0]).item()
    # the Trainer sums the logged loss in a float32 tensor: equal to float32 rounding
    assert trainer.state.log_history[0]["loss"] == pytest.approx(first, rel=1e-7, abs=0)
    assert opt.last_perturbed_loss.item() != pytest.approx(first, rel=1e-7)  # not the perturbed pass's


def test_bisam_with_perturbation_loss(tmp_path):
    make = lambda m: sharpfused.BiSAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)  # noqa: E731

    def lower(outputs, labels, num_items_in_batch=None):
        return sharpfused.losses.bisam_lower_bound(outputs["logits"], labels, backend="torch")

    model = MLP()
    opt = make(model)
    trainer = SAMTrainer(
        model=model, args=args(tmp_path), train_dataset=dataset(), optimizers=(opt, None), perturbation_loss_func=lower
    )
    trainer.train()

    def closure_kw(m, b):
        def closure(perturbation):
            out = m(**b)
            loss = lower(out, b["labels"]) if perturbation else out["loss"]
            loss.backward()
            return loss

        return closure

    ref, _ = reference(make, steps=4, bs=4, closure_kw=closure_kw)
    assert same(model, ref)


@pytest.mark.parametrize("name", ["sam_sgd", "looksam", "xsam2"])
def test_gradient_accumulation_is_large_batch(tmp_path, name):
    model, _, _ = trained(tmp_path, ALGOS[name], per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ref, _ = reference(ALGOS[name], steps=4, bs=2, ga=2)
    assert same(model, ref)  # bit for bit with step_accumulated (same passes, same order)
    big, _, _ = trained(tmp_path, ALGOS[name], per_device_train_batch_size=4)
    for p, q in zip(model.parameters(), big.parameters()):  # two half-means vs one mean: rounding only
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_gradient_accumulation_short_last_window(tmp_path):
    """5 micro-batches, gradient_accumulation_steps=2: windows of 2, 2, 1 (the Trainer divides the last by 1)."""
    data = dataset(10)
    model, _, _ = trained(tmp_path, ALGOS["sam_sgd"], data=data, per_device_train_batch_size=2,
                          gradient_accumulation_steps=2, max_steps=-1, num_train_epochs=1)
    ref = MLP()
    opt = ALGOS["sam_sgd"](ref)
    mbs = batches(data, 2)
    for group in (mbs[0:2], mbs[2:4], mbs[4:5]):
        opt.step_accumulated(lambda b: loss_fn(ref, b), group)
    assert same(model, ref)


def test_gradient_accumulation_num_items_gpt2(tmp_path):
    """GPT-2 accepts num_items_in_batch: the Trainer normalizes by the token count of the window."""
    cfg = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (8, 8), generator=g)
    labels = ids.clone()
    labels[0, 4:] = -100  # unequal token counts per micro-batch: a mean of means would differ
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(8)]
    out = []
    for bs, ga in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        opt = sharpfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.5)
        tr = SAMTrainer(
            model=model,
            args=args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=2),
            train_dataset=data,
            optimizers=(opt, None),
        )
        assert tr.model_accepts_loss_kwargs
        tr.train()
        out.append((model, [h["loss"] for h in tr.state.log_history if "loss" in h]))
    (m1, l1), (m2, l2) = out
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # float32
    assert l1 == pytest.approx(l2, rel=1e-5)


def test_sam_class_builds_on_trainer_optimizer(tmp_path):
    """sam_class= wraps the base optimizer the Trainer creates (AdamW, decay/no-decay groups, lr)."""
    kw = dict(optim="adamw_torch", weight_decay=0.1, learning_rate=0.01, max_grad_norm=1.0, eval_strategy="steps",
              eval_steps=2)
    model = MLP()
    trainer = SAMTrainer(
        model=model, args=args(tmp_path, **kw), train_dataset=dataset(), eval_dataset=dataset(8),
        sam_class=sharpfused.SAM, sam_kwargs={"rho": 0.05},
    )
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and all(math.isfinite(v) for v in evals)  # evaluation between steps (weights restored)
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, sharpfused.SAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert opt.max_grad_norm == 1.0  # TrainingArguments.max_grad_norm clips the update gradient

    def make(m):
        decay = [p for n, p in m.named_parameters() if "bias" not in n]
        nodecay = [p for n, p in m.named_parameters() if "bias" in n]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}]
        base = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
        return sharpfused.SAM([p for g in groups for p in g["params"]], base, rho=0.05, max_grad_norm=1.0)

    ref, _ = reference(make, steps=4, bs=4)
    assert same(model, ref)


def test_max_grad_norm_clips_update_gradient(tmp_path):
    make = lambda m: sharpfused.GSAM(m.parameters(), torch.optim.SGD, rho_max=0.05, alpha=0.4, lr=0.5)  # noqa: E731
    model, opt, _ = trained(tmp_path, make, max_grad_norm=0.01)
    ref, _ = reference(lambda m: sharpfused.GSAM(m.parameters(), torch.optim.SGD, rho_max=0.05, alpha=0.4, lr=0.5, max_grad_norm=0.01),
                       steps=4, bs=4)
    assert opt.max_grad_norm == 0.01
    assert same(model, ref)
    unclipped, _ = reference(make, steps=4, bs=4)
    assert not same(model, unclipped)


def test_skipped_step_does_not_step_scheduler(tmp_path):
    data = dataset(inf_at=5)  # the second batch of 4 holds an inf: loss nan, step skipped
    make = ALGOS["sam_sgd"]
    model = MLP()
    opt = make(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = SAMTrainer(model=model, args=args(tmp_path), train_dataset=data, optimizers=(opt, sched))
    skipped = []

    class Record(transformers.TrainerCallback):
        def on_optimizer_step(self, a, state, control, **kw):
            skipped.append(trainer.accelerator.optimizer_step_was_skipped)

    trainer.add_callback(Record())
    trainer.train()
    assert skipped == [False, True, False, False]
    assert int(opt.skipped_steps) == 1
    assert sched.last_epoch == 3  # 4 steps, one skipped
    ref, _ = reference(make, steps=4, bs=4, data=data,
                       sched_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    assert same(model, ref)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["sam_sgd", "looksam"])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, name):
    make = ALGOS[name]
    full, _, _ = trained(tmp_path / "a", make, max_steps=4)
    model = MLP()
    opt = make(model)
    SAMTrainer(model=model, args=args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2),
               train_dataset=dataset(), optimizers=(opt, None)).train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    assert ckpt.is_dir()
    model2 = MLP(seed=123)  # different weights: the checkpoint must bring them back
    opt2 = make(model2)
    SAMTrainer(model=model2, args=args(tmp_path / "b", max_steps=4), train_dataset=dataset(),
               optimizers=(opt2, None)).train(resume_from_checkpoint=str(ckpt))
    assert same(model2, full)


def test_bf16_on_cpu(tmp_path):
    """bf16=True on CPU: accelerate's autocast (no GradScaler); equals the loop under the same autocast."""
    def fp32_model():
        m = MLP().float()
        return m

    data = [{k: (v.float() if v.is_floating_point() else v) for k, v in d.items()} for d in dataset()]
    model = fp32_model()
    opt = ALGOS["sam_sgd"](model)
    tr = SAMTrainer(model=model, args=args(tmp_path, bf16=True), train_dataset=data, optimizers=(opt, None))
    assert tr.accelerator.mixed_precision == "bf16" and tr.accelerator.scaler is None
    tr.train()
    ref = fp32_model()
    ropt = ALGOS["sam_sgd"](ref)
    for b in batches(data, 4)[:4]:
        def closure(b=b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = ref(**b)["loss"]
            loss.float().backward()
            return loss

        ropt.step(closure)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- refusals
def test_refusals(tmp_path):
    model = MLP()
    a = args(tmp_path)
    with pytest.raises(ValueError, match="needs a sharpfused optimizer"):
        SAMTrainer(model=model, args=a, train_dataset=dataset())
    with pytest.raises(TypeError, match="must be a sharpfused optimizer"):
        SAMTrainer(model=model, args=a, train_dataset=dataset(), optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    opt = ALGOS["sam_sgd"](model)
    with pytest.raises(ValueError, match="both an optimizer"):
        SAMTrainer(model=model, args=a, train_dataset=dataset(), optimizers=(opt, None), sam_class=sharpfused.SAM)
    bisam = sharpfused.BiSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="perturbation_loss_func"):
        SAMTrainer(model=model, args=a, train_dataset=dataset(), optimizers=(bisam, None))
    with pytest.raises(ValueError, match="perturbation_loss_func"):
        SAMTrainer(model=model, args=a, train_dataset=dataset(), sam_class=sharpfused.BiSAM).train()
    clip = sharpfused.SAM(model.parameters(), torch.optim.SGD, lr=0.1, max_grad_norm=5.0)
    tr = SAMTrainer(model=model, args=args(tmp_path, max_grad_norm=1.0), train_dataset=dataset(), optimizers=(clip, None))
    with pytest.raises(ValueError, match="max_grad_norm"):
        tr.train()
    assert not clip.perturbed


def test_fp16_scaler_refusals():
    from sharpfused.integrations.accelerate import run_sam_passes

    m = MLP()
    for opt, what in ((sharpfused.LookSAM(m.parameters(), lr=0.1, k=2), "LookSAM"),
                      (sharpfused.SAMPa(m.parameters(), torch.optim.SGD, lr=0.1), "SAMPa"),
                      (sharpfused.RST(m.parameters(), torch.optim.SGD, lr=0.1), "RST"),
                      (sharpfused.AESAM(m.parameters(), torch.optim.SGD, lr=0.1), "AESAM"),
                      (sharpfused.MESA(m.parameters(), torch.optim.SGD, lr=0.1), "MESA")):
        with pytest.raises(RuntimeError, match=f"{what}.*GradScaler"):
            run_sam_passes(opt, lambda perturbation: None, None, scaler=object())


# ---------------------------------------------------------------------------- docs and example
def _snippet(doc: str, name: str) -> str:
    text = (ROOT / "docs" / doc).read_text()
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"no '<!-- snippet: {name} -->' python block in docs/{doc}"
    return m.group(1)


def test_doc_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippet("huggingface.md", "huggingface"), "docs/huggingface.md", "exec"), {"__name__": "snippet"})


def test_example_quick(tmp_path, monkeypatch):
    import runpy
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["hf_trainer.py", "--quick"])
    runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"), run_name="__main__")
