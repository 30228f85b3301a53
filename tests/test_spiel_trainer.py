"""SpielTrainer (Hugging Face Trainer integration): optimizer choice, selector stepping, adapter-only
checkpoints, and kill/resume giving the same final adapter as an uninterrupted run."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from conftest import make_tiny_llama
from spiel.config import SpielConfig
from spiel.model import WEIGHTS_NAME, SpielModel, get_spiel_model
from spiel.optim import SM3, SparseAdamW
from spiel.trainer import SELECTOR_STATE_NAME, SpielCallback, SpielTrainer, load_adapter_weights, make_optimizer
from spiel.selection import SpielSelector


os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _dataset(n=16, seq=12):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 128, (n, seq), generator=gen)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def _model(algo):
    cfg = SpielConfig(density=0.05, selection_algorithm=algo, reselection_steps=4, selection_accumulation_steps=1,
                      initial_reselection_rate=0.3)
    return get_spiel_model(make_tiny_llama(0), cfg)


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="linear", save_strategy="steps",
                save_steps=4, logging_steps=100, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class _StopAt(TrainerCallback):
    """Simulates a killed job: stop right after the checkpoint of step ``step`` is written."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _adapter(model):
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


def test_trainer_kill_and_resume_gives_the_uninterrupted_adapter(tmp_path):
    data = _dataset()
    full_model = _model("ag")
    full = SpielTrainer(model=full_model, args=_args(tmp_path / "full", save_strategy="no"), train_dataset=data,
                        data_collator=default_data_collator)
    full.train()
    assert isinstance(full.selector.optimizer, SparseAdamW)
    assert [h["step"] for h in full.selector.history] == [1, 5]
    assert all(layer.weight_grad_hook is None for _, layer in full_model.sparse_layers())
    expected = _adapter(full_model)

    killed = SpielTrainer(model=_model("ag"), args=_args(tmp_path / "run"), train_dataset=data,
                          data_collator=default_data_collator, callbacks=[_StopAt(4)])
    killed.train()
    ckpt = tmp_path / "run" / "checkpoint-4"
    files = set(os.listdir(ckpt))
    assert {WEIGHTS_NAME, "adapter_config.json", SELECTOR_STATE_NAME, "optimizer.pt"} <= files
    # the Trainer's own checkpoint file holds the adapter tensors only, never the base weights
    from safetensors.torch import load_file

    assert set(load_file(ckpt / "model.safetensors")) == set(load_file(ckpt / WEIGHTS_NAME))
    saved_sel = torch.load(ckpt / SELECTOR_STATE_NAME, weights_only=True)
    assert saved_sel["completed_steps"] == 4 and saved_sel["phase_open"]  # mid-phase: accumulators kept
    assert saved_sel["accumulators"]

    resumed_model = _model("ag")
    resumed = SpielTrainer(model=resumed_model, args=_args(tmp_path / "run"), train_dataset=data,
                           data_collator=default_data_collator)
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = _adapter(resumed_model)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert resumed.selector.history == full.selector.history

    # The final adapter written by save_model reloads onto a fresh base with identical tensors.
    resumed.save_model(str(tmp_path / "final"))
    reloaded = SpielModel.from_pretrained(make_tiny_llama(0), tmp_path / "final")
    for key, value in reloaded.adapter_state_dict().items():
        assert torch.equal(value, expected[key])


def test_trainer_ma_uses_sm3_and_reselects(tmp_path):
    model = _model("ma")
    idx0 = {n: l.indices.clone() for n, l in model.sparse_layers()}
    trainer = SpielTrainer(model=model, args=_args(tmp_path, max_steps=6, save_strategy="no"),
                           train_dataset=_dataset(), data_collator=default_data_collator)
    trainer.train()
    assert isinstance(trainer.selector.optimizer, SM3)
    assert [h["step"] for h in trainer.selector.history] == [1, 5]
    assert any(not torch.equal(l.indices, idx0[n]) for n, l in model.sparse_layers())


def test_stock_trainer_with_callback_and_errors(tmp_path):
    from transformers import Trainer

    model = _model("ag")
    args = _args(tmp_path, max_steps=3, save_steps=2)
    opt = make_optimizer(model, args)
    assert isinstance(opt, SparseAdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    sel = SpielSelector(model, opt, total_steps=3, grad_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=default_data_collator,
                      optimizers=(opt, None), callbacks=[SpielCallback(sel)])
    trainer.train()
    assert sel.completed_steps == 3 and [h["step"] for h in sel.history] == [1]
    assert (tmp_path / "checkpoint-2" / SELECTOR_STATE_NAME).is_file()
    with pytest.raises(ValueError, match="SpielModel"):
        SpielTrainer(model=make_tiny_llama(0), args=args)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_adapter_weights(model, tmp_path)


def test_trainer_qspiel_on_a_4bit_base(tmp_path):
    """qSpIEL under SpielTrainer: transformers refuses 'purely quantized' models without adapters; the
    sparse deltas count as the adapter, training runs and only Δ changes (the NF4 base stays packed)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny_llama(0).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
    assert base.is_quantized
    cfg = SpielConfig(density=0.05, selection_algorithm="ag", reselection_steps=4, selection_accumulation_steps=1,
                      delta_dtype="bfloat16")
    model = get_spiel_model(base, cfg)
    packed = model.sparse_layers()[0][1].base_layer.weight.data.clone()
    trainer = SpielTrainer(model=model, args=_args(tmp_path / "out", max_steps=3, save_strategy="no"),
                           train_dataset=_dataset(), data_collator=default_data_collator)
    trainer.train()
    assert [h["step"] for h in trainer.selector.history] == [1]
    for name, layer in model.sparse_layers():
        assert layer.values.dtype == torch.bfloat16 and bool((layer.values != 0).any()), name
    assert torch.equal(model.sparse_layers()[0][1].base_layer.weight.data, packed)
    # A stock Trainer accepts the NF4 SpielModel too (the wrapper says it carries the adapter); the
    # wrapped transformers model keeps its own flag.
    from transformers import Trainer

    assert model._hf_peft_config_loaded and not model.base_model._hf_peft_config_loaded
    args = _args(tmp_path / "stock", max_steps=2, save_strategy="no")
    opt = make_optimizer(model, args)
    before = {n: l.values.detach().clone() for n, l in model.sparse_layers()}
    Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=default_data_collator,
            optimizers=(opt, None)).train()
    assert any(not torch.equal(l.values, before[n]) for n, l in model.sparse_layers())
    assert torch.equal(model.sparse_layers()[0][1].base_layer.weight.data, packed)


def _tied_model(algo="ag"):
    cfg = SpielConfig(density=0.05, selection_algorithm=algo, reselection_steps=4, selection_accumulation_steps=1,
                      initial_reselection_rate=0.3)
    return get_spiel_model(make_tiny_llama(0, tie_word_embeddings=True), cfg)


def _stock(model, args, callbacks=()):
    from transformers import Trainer

    return Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=default_data_collator,
                   optimizers=(make_optimizer(model, args), None), callbacks=[SpielCallback(), *callbacks])


def test_stock_trainer_on_tied_embeddings_checkpoints_the_adapter_and_resumes_exactly(tmp_path):
    """The public recipe (optimizer factory + callback) on a tied-embedding model, as SmolLM2: checkpoints
    hold the adapter and the selector state only, and kill/resume gives the uninterrupted adapter."""
    from safetensors.torch import load_file

    full_model = _tied_model()
    full = _stock(full_model, _args(tmp_path / "full", save_strategy="no"))
    full.train()
    spiel_cb = next(cb for cb in full.callback_handler.callbacks if isinstance(cb, SpielCallback))
    expected, history = _adapter(full_model), spiel_cb.selector.history
    assert [h["step"] for h in history] == [1, 5]

    _stock(_tied_model(), _args(tmp_path / "run"), callbacks=[_StopAt(4)]).train()
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert set(load_file(ckpt / "model.safetensors")) == set(expected)  # no base weights, no shared tensors
    assert {WEIGHTS_NAME, "adapter_config.json", SELECTOR_STATE_NAME, "optimizer.pt"} <= set(os.listdir(ckpt))
    base_bytes = sum(p.numel() * p.element_size() for p in make_tiny_llama(0).parameters())
    assert (ckpt / "model.safetensors").stat().st_size < base_bytes / 4  # 5% density: k indices + k values
    assert SpielModel.from_pretrained(make_tiny_llama(0, tie_word_embeddings=True), ckpt)  # a loadable adapter

    resumed_model = _tied_model()
    resumed = _stock(resumed_model, _args(tmp_path / "run"))
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = _adapter(resumed_model)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    callback = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, SpielCallback))
    assert callback.selector.history == history

    # an AG checkpoint resumed as MA is refused, naming both optimizers
    wrong = _stock(_tied_model("ma"), _args(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"saved by SparseAdamW \(SpIEL-AG\).*this optimizer is SM3 \(SpIEL-MA\)"):
        wrong.train(resume_from_checkpoint=str(ckpt))


def test_trl_sft_trainer_trains_a_spiel_model(tmp_path, eval_tokenizer):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = SpielConfig(density=0.05, reselection_steps=2, selection_accumulation_steps=1)
    model = get_spiel_model(make_tiny_llama(0, vocab_size=len(eval_tokenizer), tie_word_embeddings=True), cfg)
    before = _adapter(model)
    sft = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="steps", save_steps=2,
               report_to=[], use_cpu=True, disable_tqdm=True, max_length=32, logging_steps=100,
               dataloader_num_workers=0, seed=0, bf16=False)
    args = SFTConfig(output_dir=str(tmp_path), loss_type="nll", **sft)
    rows = [{"text": t} for t in ["Question hello world Answer no", " Hi there Question maybe", " hello never",
                                  "Answer world Question Hi there no", " B C D", "Question world Answer maybe"]]
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=eval_tokenizer, optimizers=(make_optimizer(model, args), None),
                         callbacks=[SpielCallback()])
    trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SpielCallback))
    assert callback.selector.completed_steps == 4 and [h["step"] for h in callback.selector.history] == [1, 3]
    after = _adapter(model)
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith(".values"))
    reloaded = SpielModel.from_pretrained(make_tiny_llama(0, vocab_size=len(eval_tokenizer), tie_word_embeddings=True),
                                          tmp_path / "checkpoint-4")
    for key, value in reloaded.adapter_state_dict().items():
        assert torch.equal(value, after[key])
    # TRL's default chunked loss replaces the model's forward with one that needs a transformers layout
    model = get_spiel_model(make_tiny_llama(0, vocab_size=len(eval_tokenizer)), cfg)
    args = SFTConfig(output_dir=str(tmp_path / "chunked"), loss_type="chunked_nll", **sft)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=eval_tokenizer,
                         optimizers=(make_optimizer(model, args), None), callbacks=[SpielCallback()])
    with pytest.raises(ValueError, match=r"SpielModel.forward was replaced.*loss_type='nll'"):
        trainer.train()


def test_plain_loop_of_the_docstring_matches_one_large_batch():
    """The loop in spiel.trainer's docstring: micro-batches of different label counts, each loss summed and
    divided by the step's label tokens, give the gradient of one batch holding them all."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (4, 10), generator=gen)
    labels = ids.clone()
    lengths = [10, 3, 9, 2]  # label tokens per row vary a lot: right-padded rows
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        labels[row, n:] = -100
    micro_batches = [{"input_ids": ids[i:i + 2], "attention_mask": mask[i:i + 2], "labels": labels[i:i + 2]}
                     for i in (0, 2)]

    def grads(model):
        return torch.cat([layer.values.grad.flatten() for _, layer in model.sparse_layers()])

    model = _model("ag")
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # one large batch, token mean
    reference = grads(model)

    import textwrap

    import spiel.trainer

    lines = spiel.trainer.__doc__.splitlines()  # run the docstring's own lines, from n_tokens to backward()
    start = next(i for i, line in enumerate(lines) if "n_tokens = " in line)
    end = next(i for i, line in enumerate(lines) if i > start and "loss.backward()" in line)
    model = _model("ag")
    exec(textwrap.dedent("\n".join(lines[start:end + 1])), {"F": F, "micro_batches": micro_batches, "model": model})
    torch.testing.assert_close(grads(model), reference, rtol=1e-4, atol=1e-7)

    model = _model("ag")  # the old example (each micro-batch's mean / GA) is off against one batch
    for mb in micro_batches:
        (model(**mb).loss / len(micro_batches)).backward()
    assert not torch.allclose(grads(model), reference, rtol=1e-2, atol=1e-6)


def test_spiel_trainer_overrides_no_private_trainer_method():
    from transformers import Trainer

    private = [name for name in vars(SpielTrainer) if name.startswith("_") and not name.startswith("__")
               and callable(getattr(Trainer, name, None))]
    assert private == []  # public API only: optimizers=, callbacks=, save_model


@pytest.mark.slow
def test_stock_trainer_checkpoints_real_smollm2_with_tied_embeddings(tmp_path, real_model_dir):
    """The failure of the issue on the real model: SmolLM2 ties lm_head to the input embeddings, and a
    stock Trainer checkpoint of the wrapped model used to stop with "Some tensors share memory"."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    assert base.config.tie_word_embeddings
    model = get_spiel_model(base, SpielConfig(lora_rank_equivalent=1, reselection_steps=2,
                                              selection_accumulation_steps=1))
    ids = torch.randint(3, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    args = _args(tmp_path, max_steps=2, save_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                 learning_rate=1e-4)
    from transformers import Trainer

    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
            optimizers=(make_optimizer(model, args), None), callbacks=[SpielCallback()]).train()
    ckpt = tmp_path / "checkpoint-2"
    assert set(load_file(ckpt / "model.safetensors")) == set(model.adapter_state_dict())
    assert (ckpt / "model.safetensors").stat().st_size < 20e6  # the base alone is 538 MB in float32
